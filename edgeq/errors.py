"""The user-facing name of edgeq's errors (`edgeq.errors.EdgeqError`); they live in the bottom layer,
`targets/errors.py`, so that every layer can raise them without importing upwards."""

from targets.errors import EdgeqError, interruptible, one_line, raise_if_interrupted

__all__ = ["EdgeqError", "interruptible", "one_line", "raise_if_interrupted"]
