"""Device presets and toolchains: `resolve("rpi4")`, `resolve('{"kind": "llvm", ...}')`."""

from __future__ import annotations

import json
import platform

from .errors import EdgeqError

from .detect import host_preset
from .presets import PRESETS, Preset
from .toolchains import find_compiler, toolchain_status

# A raw target JSON's mtriple prefix -> (cross compiler, Debian package, ELF machine)
_TRIPLE_TOOLCHAINS = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "aarch64"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf", "arm"),
    "x86_64": (None, None, "x86_64"),
}


def all_presets() -> list[Preset]:
    return [host_preset(), *PRESETS.values()]


def _custom_preset(text: str) -> Preset:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgeqError(f"target is neither a preset nor valid JSON: {e}") from None
    if not isinstance(spec, dict) or "kind" not in spec:
        raise EdgeqError('a raw target must be a JSON object with a "kind", e.g. {"kind": "llvm", "mcpu": "cortex-a72"}')
    host = spec.pop("host", None)
    cpu_side = host if spec["kind"] != "llvm" else spec
    triple = (cpu_side or {}).get("mtriple") or platform.machine()
    for prefix, (compiler, package, arch) in _TRIPLE_TOOLCHAINS.items():
        if triple.startswith(prefix):
            break
    else:
        raise EdgeqError(f"no known toolchain for mtriple {triple!r}; known: {', '.join(_TRIPLE_TOOLCHAINS)}")
    return Preset("custom", "raw target JSON", spec, host=host, compiler=compiler, package=package, arch=arch)


def resolve(target: str | dict | Preset) -> Preset:
    """A preset by name, or a custom one from a raw TVM target JSON (string or dict)."""
    if isinstance(target, Preset):
        return target
    if isinstance(target, dict):
        return _custom_preset(json.dumps(target))
    if target == "host":
        return host_preset()
    if target in PRESETS:
        return PRESETS[target]
    if target.lstrip().startswith("{"):
        return _custom_preset(target)
    raise EdgeqError(f"unknown target {target!r}; presets: host, {', '.join(PRESETS)} (or a raw target JSON)")


def tvm_target(preset: Preset):
    """The tvm.target.Target of a preset; a bad raw JSON becomes an EdgeqError."""
    import tvm

    try:
        return tvm.target.Target(preset.target, host=preset.host) if preset.host else tvm.target.Target(preset.target)
    except Exception as e:  # TVM raises its own error types for unknown keys or kinds
        raise EdgeqError(f"invalid TVM target {json.dumps(preset.target)}: {str(e).strip().splitlines()[-1]}") from None


__all__ = ["Preset", "PRESETS", "all_presets", "resolve", "tvm_target", "find_compiler", "toolchain_status"]
