"""Adapters from training frameworks onto `Telemetry`: `hf` (transformers Trainer), `deepspeed`.

Each is imported on its own (`otel_train.integrations.hf`), so neither framework is needed
to import otel_train.
"""
