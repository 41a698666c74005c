"""The one question every kernel choice asks of a target: does its CPU have this LLVM feature?

LLVM answers from the target's mcpu and mattr; a target that is not an LLVM CPU target (CUDA), or a feature
name this LLVM does not know, counts as absent.
"""

from __future__ import annotations

_VECTOR_BYTES = (("avx512f", 64), ("avx", 32))  # widest SIMD register first; 16 bytes (SSE, NEON) otherwise


def has_feature(target, feature: str) -> bool:
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return False
    try:
        return bool(codegen.target_has_features(feature, target))
    except (RuntimeError, ValueError):
        return False


def vector_bytes(target) -> int:
    """SIMD register width in bytes of an llvm target (16 if unknown)."""
    return next((width for feature, width in _VECTOR_BYTES if has_feature(target, feature)), 16)
