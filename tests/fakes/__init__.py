"""Faithful fakes for what cannot exist on CI (a GPU): named as fakes, used only in tests."""
