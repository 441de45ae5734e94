"""What an exporter needs to know about the run it exports, resolved once by `setup()`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otel_train.naming import KeyNamer

_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")


def file_safe_run_name(run: str) -> str:
    """`team/exp..1` -> `team_exp_1`: never a path separator or a parent reference."""
    safe = _UNSAFE_FILE_CHARS.sub("_", run)
    safe = re.sub(r"\.{2,}", "_", safe).strip("._")
    return safe or "run"


def output_dir_from(output_dir: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """Argument > OTEL_TRAIN_OUTPUT_DIR > ./runs: one rule for setup() and env-only exporters."""
    return Path(output_dir or env.get("OTEL_TRAIN_OUTPUT_DIR") or "runs")


def run_dir_for(output_dir: Path, run: str) -> Path:
    """Where one run's files live: `<output_dir>/<file-safe run name>`."""
    return output_dir / file_safe_run_name(run)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """Identity and places of one rank's run. `run` is the user's name, kept verbatim."""

    run: str
    stage: str
    rank: int
    local_rank: int
    world_size: int
    host: str
    output_dir: Path
    config: Mapping[str, Any] = field(default_factory=dict)  # secrets already redacted
    resume: bool = False
    namer: KeyNamer = field(default_factory=KeyNamer)
    total_steps: int | None = None
    # reduce_across_ranks=True on rank 0 of a multi-rank job: the reduced instruments hold
    # all-rank values here, so label-based exporters tag them scope="global".
    exports_global_values: bool = False

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.output_dir, self.run)

    @property
    def is_main_rank(self) -> bool:
        return self.rank == 0
