"""`python -m otel_train.cli ...` is the same as `otel-train ...`."""

from __future__ import annotations

import sys

from otel_train.cli import main

sys.exit(main())
