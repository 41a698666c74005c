"""Find the compiler that links a preset's model.so, and say plainly when there is none."""

from __future__ import annotations

import glob
import os
import shutil

from .presets import Preset

NDK_API_LEVEL = 24


def _ndk_compiler() -> str | None:
    """The NDK clang for arm64: TVM_NDK_CC wins, else the newest API-level driver under ANDROID_NDK_HOME."""
    if os.environ.get("TVM_NDK_CC"):
        return shutil.which(os.environ["TVM_NDK_CC"])
    home = os.environ.get("ANDROID_NDK_HOME")
    if not home:
        return None
    exact = os.path.join(home, "toolchains/llvm/prebuilt/linux-x86_64/bin",
                         f"aarch64-linux-android{NDK_API_LEVEL}-clang")
    if os.path.exists(exact):
        return exact
    found = sorted(glob.glob(os.path.join(home, "toolchains/llvm/prebuilt/*/bin/aarch64-linux-android*-clang")))
    return found[-1] if found else None


def find_compiler(preset: Preset) -> str | None:
    """Path of the executable that links this preset's shared library, or None when it is missing."""
    if preset.compiler == "ndk":
        return _ndk_compiler()
    if preset.compiler is None:
        return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    return shutil.which(preset.compiler)


def toolchain_status(preset: Preset) -> str:
    """One phrase for `edgeq targets`: what links this preset here, or how to get it."""
    compiler = find_compiler(preset)
    if compiler is None:
        hint = preset.package if preset.compiler == "ndk" else f"apt-get install {preset.package}"
        return f"missing: {hint} (until then: model.tar)"
    status = f"ok ({os.path.basename(compiler)})"
    if preset.is_gpu:
        status += ", nvcc " + ("found" if shutil.which("nvcc") else "missing")
    return status
