"""What an exporter needs to know about the run it exports, resolved once by `setup()`."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otel_train.env import OUTPUT_DIR
from otel_train.errors import OtelTrainError
from otel_train.naming import KeyNamer

# Letters and digits of every script (`\w` is Unicode-aware) and a few safe marks; anything
# else (path separators, spaces, control characters) becomes `_`.
_UNSAFE_FILE_CHAR = re.compile(r"[^\w.=+-]")
# File systems cap one name at 255 bytes; stay far below so `<run>/rank<N>.jsonl` and the
# temp names of atomic writes fit too.
MAX_RUN_FOLDER_BYTES = 100
_DIGEST_CHARS = 8


class RunNameError(OtelTrainError):
    """A run name that cannot name a folder (empty, `.` or `..`)."""


def file_safe_run_name(run: str) -> str:
    """The run's folder name: the name itself when it is safe, else a safe spelling plus a
    short hash of the original, so distinct names never share a folder.

    `gpt-small` -> `gpt-small`; `训练-实验` -> `训练-实验`; `a/b` -> `a_b-<hash>` (not `a_b`'s
    folder); a name over `MAX_RUN_FOLDER_BYTES` is cut and hashed. Empty, `.`, `..` (or only
    dots) raise `RunNameError`."""
    stripped = run.strip() if isinstance(run, str) else ""
    if not stripped or set(stripped) == {"."}:
        raise RunNameError(
            f"run={run!r} cannot name the run's folder; pass a name with letters or digits, "
            "e.g. run='gpt-small-sft'"
        )
    safe = _UNSAFE_FILE_CHAR.sub("_", run)
    if safe.startswith("."):  # no hidden folders
        safe = "_" + safe[1:]
    if safe == run and len(safe.encode("utf-8")) <= MAX_RUN_FOLDER_BYTES:
        return safe
    digest = hashlib.sha256(run.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    room = MAX_RUN_FOLDER_BYTES - _DIGEST_CHARS - 1
    cut = safe.encode("utf-8", "replace")[:room].decode("utf-8", "ignore")  # whole characters
    return f"{cut}-{digest}"


def output_dir_from(output_dir: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """Argument > OTEL_TRAIN_OUTPUT_DIR > ./runs: one rule for setup() and env-only exporters."""
    return Path(output_dir or OUTPUT_DIR.read(env) or "runs")


def run_dir_for(output_dir: Path, run: str) -> Path:
    """Where one run's files live: `<output_dir>/<file-safe run name>`."""
    return output_dir / file_safe_run_name(run)


class ValueScope:
    """Whether this rank's reduced instruments hold all-rank values now. Set by the cross-rank
    reduction as each sampled step is exported: True only once an all_reduce has replaced
    this rank's values, so a job whose `torch.distributed` is not (yet) initialised, or whose
    reduction failed, labels its own values `scope="rank"`, never "global"."""

    __slots__ = ("global_values",)

    def __init__(self, global_values: bool = False) -> None:
        self.global_values = global_values


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
    # setup(reduce_across_ranks=True): what the reduction really did at the last sampled step
    # (label-based exporters ask `values_are_global()`); None: `exports_global_values` holds.
    value_scope: ValueScope | None = None

    def __post_init__(self) -> None:
        file_safe_run_name(self.run)  # a run that cannot name a folder fails before any export

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.output_dir, self.run)

    def values_are_global(self) -> bool:
        """Whether the reduced instruments' values exported now are all-rank ones."""
        scope = self.value_scope
        return self.exports_global_values if scope is None else scope.global_values

    @property
    def is_main_rank(self) -> bool:
        return self.rank == 0
