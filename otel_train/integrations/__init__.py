"""Adapters from training frameworks onto `Telemetry`: `hf` (transformers Trainer and TRL),
`lightning`, `accelerate` (a tracker), `deepspeed`.

Each is imported on its own (`otel_train.integrations.hf`), so no framework is needed to
import otel_train.
"""
