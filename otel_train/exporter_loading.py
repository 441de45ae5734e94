"""Turn `exporters=("jsonl", "wandb", ...)` into exporter objects, importing lazily.

`exporters` is a top-level package, so an unrelated PyPI package of that name, or a user's
own `exporters/` folder in the working directory, can shadow ours: check what was imported.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

from otel_train.errors import ExporterClashError, OtelTrainError
from otel_train.exporter_contract import ExporterFactory
from otel_train.run_context import RunContext

_logger = logging.getLogger(__name__)

EXPORTER_MODULES: Mapping[str, str] = {
    "jsonl": "exporters.jsonl",
    "wandb": "exporters.wandb",
    "prometheus": "exporters.prometheus",
    "otlp": "exporters.otlp",
}


def _import_ours(module_name: str) -> Any:
    package = importlib.import_module("exporters")
    if not getattr(package, "__otel_train__", False):
        raise ExporterClashError(
            f"the 'exporters' package imported from {getattr(package, '__file__', '?')} is not "
            "otel-train's: another package or a local folder named 'exporters' shadows it. "
            "Rename the folder, or `pip uninstall exporters`, then reinstall otel-train."
        )
    return importlib.import_module(module_name)


def check_exporter_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in EXPORTER_MODULES]
    if unknown:
        raise OtelTrainError(
            f"unknown exporter name(s) {unknown}; choose from {sorted(EXPORTER_MODULES)} "
            "or pass an OTel MetricExporter / MetricReader object"
        )


def create_named_exporter(name: str, context: RunContext) -> Any | None:
    """The exporter (or reader) for `name`, or None when it does not apply here.

    A missing optional dependency is not fatal: training runs on with the other exporters
    and one warning says what to install.
    """
    module_name = EXPORTER_MODULES[name]
    try:
        module = _import_ours(module_name)
        if not isinstance(module, ExporterFactory):
            raise OtelTrainError(f"{module_name} has no create_for_run(context) factory")
        return module.create_for_run(context)
    except ExporterClashError:
        raise
    except ImportError as error:
        _logger.warning(
            "otel-train: exporter %r is unavailable (%s); continuing without it. "
            'Install it with: pip install "otel-train[%s]"',
            name,
            error,
            name,
        )
        return None
