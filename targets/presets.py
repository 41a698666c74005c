"""Named device presets: one row of data per device, no per-device branching elsewhere.

A preset says how to generate code (TVM target JSON, plus a host target for GPUs), how to link it
(cross compiler and the Debian package that provides it), how many threads the device has, and which
ISA features the integer and bit-serial kernels may rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_A64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
_ARM32_HF = {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mfloat-abi": "hard"}
_X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    target: dict
    host: dict | None = None  # host-side code of a GPU target (the CPU that launches kernels)
    compiler: str | None = None  # executable that links model.so; None: the system C compiler
    package: str | None = None  # where that compiler comes from
    threads: int = 4
    arch: str = "x86_64"  # ELF machine of the shared object: x86_64, aarch64, arm
    features: tuple[str, ...] = field(default=())

    @property
    def is_gpu(self) -> bool:
        return self.target["kind"] != "llvm"

    @property
    def activation_dtype(self) -> str:
        """The 8-bit activation type of its int8 kernels: what its dot-product instruction multiplies the int8
        weights with (u8 x s8: x86 VNNI / pmaddubsw; s8 x s8: Arm sdot / NEON)."""
        return "uint8" if self.is_gpu else _ACTIVATION_DTYPES.get(self.arch, "uint8")


_ACTIVATION_DTYPES = {"aarch64": "int8", "arm": "int8"}  # ELF machine -> activation dtype (default uint8)


def _cuda(sm: str, host: dict, **kw) -> dict:
    return dict(target={"kind": "cuda", "arch": sm}, host=host, features=("cuda", sm, "dp4a"), **kw)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("x86-avx2", "x86-64 with AVX2 and FMA (Haswell and later)",
               {**_X86, "mcpu": "haswell"}, threads=4, features=("avx2", "fma")),
        Preset("x86-avx512", "x86-64 with AVX-512 and VNNI (Cascade Lake and later)",
               {**_X86, "mcpu": "cascadelake"}, threads=8, features=("avx2", "fma", "avx512f", "avx512_vnni")),
        Preset("rpi3", "Raspberry Pi 3 / Zero 2, 64-bit OS (Cortex-A53)",
               {**_A64, "mcpu": "cortex-a53", "mattr": ["+neon"]}, compiler="aarch64-linux-gnu-gcc",
               package="gcc-aarch64-linux-gnu", arch="aarch64", features=("neon",)),
        Preset("rpi3-32", "Raspberry Pi 3, 32-bit Raspberry Pi OS (armv7, hard float)",
               {**_ARM32_HF, "mcpu": "cortex-a53", "mattr": ["+neon", "+vfp4"]}, compiler="arm-linux-gnueabihf-gcc",
               package="gcc-arm-linux-gnueabihf", arch="arm", features=("neon",)),
        Preset("rpi4", "Raspberry Pi 4 / 400, 64-bit OS (Cortex-A72)",
               {**_A64, "mcpu": "cortex-a72", "mattr": ["+neon"]}, compiler="aarch64-linux-gnu-gcc",
               package="gcc-aarch64-linux-gnu", arch="aarch64", features=("neon",)),
        Preset("rpi5", "Raspberry Pi 5, 64-bit OS (Cortex-A76, dot product)",
               {**_A64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}, compiler="aarch64-linux-gnu-gcc",
               package="gcc-aarch64-linux-gnu", arch="aarch64", features=("neon", "dotprod")),
        Preset("android-arm64", "Android phone, arm64-v8a (links with the NDK clang)",
               {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}, compiler="ndk",
               package="the Android NDK: set ANDROID_NDK_HOME or TVM_NDK_CC", threads=8,
               arch="aarch64", features=("neon",)),
        Preset("jetson-orin", "NVIDIA Jetson Orin (CUDA sm_87, Cortex-A78AE host)",
               **_cuda("sm_87", {**_A64, "mcpu": "cortex-a78", "mattr": ["+neon", "+dotprod"]},
                       compiler="aarch64-linux-gnu-gcc", package="gcc-aarch64-linux-gnu", threads=6,
                       arch="aarch64")),
        Preset("cuda-sm80", "NVIDIA Ampere data-center GPU (A100), x86-64 host", **_cuda("sm_80", _X86)),
        Preset("cuda-sm89", "NVIDIA Ada GPU (RTX 40xx, L4), x86-64 host", **_cuda("sm_89", _X86)),
        Preset("cuda-sm90", "NVIDIA Hopper GPU (H100), x86-64 host", **_cuda("sm_90", _X86)),
    ]
}
