"""Tensor signatures (name, shape, dtype) and checking user-supplied arrays against them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import EdgeqError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{'x'.join(map(str, self.shape))}]"


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise EdgeqError(f"bad shape {text!r}: expected positive integers joined by 'x', e.g. 1x3x224x224")
    return dims


def parse_input_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """['x=1x3x224x224', ...] -> {'x': (1, 3, 224, 224)}."""
    shapes = {}
    for item in items or []:
        name, sep, shape = item.rpartition("=")
        if not sep or not name:
            raise EdgeqError(f"bad --input-shape {item!r}: expected NAME=DIMS, e.g. image=1x3x224x224")
        shapes[name] = parse_shape(shape)
    return shapes


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays from an .npz (by key) or a single .npy (keyed by its file stem)."""
    path = os.fspath(path)
    try:
        if path.endswith(".npy"):
            return {os.path.splitext(os.path.basename(path))[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise EdgeqError(f"cannot read arrays from {path}: {e}") from None


def match_inputs(specs: list[TensorSpec], feeds) -> list[np.ndarray]:
    """Order and check user inputs (dict by name, list, or one array) against the model's inputs."""
    if isinstance(feeds, np.ndarray):
        feeds = [feeds]
    if isinstance(feeds, dict):
        unknown = sorted(set(feeds) - {s.name for s in specs})
        if unknown:
            raise EdgeqError(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(map(str, specs))}")
        missing = [str(s) for s in specs if s.name not in feeds]
        if missing:
            raise EdgeqError(f"missing input(s) {', '.join(missing)}")
        feeds = [feeds[s.name] for s in specs]
    feeds = list(feeds)
    if len(feeds) != len(specs):
        raise EdgeqError(f"got {len(feeds)} input(s), the model takes {len(specs)}: {', '.join(map(str, specs))}")
    arrays = []
    for spec, value in zip(specs, feeds):
        a = np.asarray(value)
        if tuple(a.shape) != spec.shape:
            raise EdgeqError(f"input {spec.name!r} has shape {list(a.shape)}, expected {list(spec.shape)}")
        if a.dtype != np.dtype(spec.dtype):
            if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                raise EdgeqError(f"input {spec.name!r} has dtype {a.dtype}, expected {spec.dtype}")
            a = a.astype(spec.dtype)
        arrays.append(np.ascontiguousarray(a))
    return arrays


def random_inputs(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for benchmarking and smoke runs: N(0,1) floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if np.issubdtype(np.dtype(s.dtype), np.floating):
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
        elif s.dtype == "bool":
            out[s.name] = rng.integers(0, 2, s.shape).astype(bool)
        else:
            out[s.name] = rng.integers(0, 4, s.shape).astype(s.dtype)
    return out
