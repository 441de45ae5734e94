"""`otel_train.env` is the one list of environment variables: the code reads no other
`OTEL_TRAIN_*` name, and the README's table is the one generated from it."""

from __future__ import annotations

import re
from pathlib import Path

from otel_train import env

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"OTEL_TRAIN_[A-Z0-9_]*[A-Z0-9]")


def test_every_otel_train_name_in_the_code_base_is_declared_in_env():
    declared = {var.name for var in env.VARIABLES}
    found: dict[str, set[str]] = {}
    for folder in ("otel_train", "exporters", "tests", "benchmarks", "dashboards"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yml", ".yaml", ".json", ".md", ".toml"):
                continue
            for name in NAME.findall(path.read_text(encoding="utf-8", errors="replace")):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    for name in NAME.findall((ROOT / "README.md").read_text(encoding="utf-8")):
        found.setdefault(name, set()).add("README.md")
    undeclared = {name: sorted(where) for name, where in found.items() if name not in declared}
    assert not undeclared, f"declare these in otel_train/env.py: {undeclared}"


def test_readme_table_is_the_one_generated_from_env():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- env-table:start -->\n", 1)[1].split("\n<!-- env-table:end -->", 1)[0]
    assert table == env.markdown_table(), "regenerate it: python -m otel_train.env"


def test_env_values_parse_as_setup_reads_them(monkeypatch):
    monkeypatch.setenv("OTEL_TRAIN_EXPORTERS", " jsonl , prometheus,")
    monkeypatch.setenv("OTEL_TRAIN_RESUME", "Yes")
    monkeypatch.setenv("OTEL_TRAIN_PEAK_FLOPS", "9.89e14")
    monkeypatch.setenv("LOCAL_RANK", "three")
    assert env.EXPORTERS.read() == ["jsonl", "prometheus"]
    assert env.RESUME.read() is True
    assert env.PEAK_FLOPS.read() == 9.89e14
    assert env.launcher_int("LOCAL_RANK") is None  # a launcher's junk means "not given"
    monkeypatch.delenv("OTEL_TRAIN_RUN", raising=False)
    assert env.RUN.read() is None
