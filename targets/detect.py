"""Describe the machine we run on as a preset: TVM rejects `mcpu=native`, so we ask LLVM and the kernel."""

from __future__ import annotations

import os
import platform

from .presets import Preset

# /proc/cpuinfo flag -> feature name used by the kernels (x86 "flags", aarch64 "Features")
_CPU_FLAGS = {
    "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni", "avx512_vpopcntdq": "avx512_vpopcntdq",
    "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm",
}
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def cpu_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """ISA features of this CPU that edgeq's kernels care about, read from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return ()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(sorted({name for flag, name in _CPU_FLAGS.items() if flag in flags}))


def host_arch() -> str:
    """This machine's architecture, named as presets and manifests name it."""
    return _ARCH.get(platform.machine().lower(), platform.machine())


def host_preset() -> Preset:
    """The `host` preset: this CPU's LLVM name, triple, core count and features."""
    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu()
    arch = host_arch()
    # LLVM's own triple may carry its build vendor (x86_64-conda-linux-gnu); the system linker wants the plain one
    target = {"kind": "llvm", "mtriple": f"{arch}-linux-gnu", "num-cores": os.cpu_count() or 1}
    if mcpu and mcpu != "generic":
        target["mcpu"] = mcpu
    return Preset(
        name="host",
        description=f"this machine ({mcpu}, {os.cpu_count()} cores)",
        target=target,
        threads=os.cpu_count() or 1,
        arch=arch,
        features=cpu_features(),
    )
