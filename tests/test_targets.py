"""Presets: every one makes a valid TVM target; cross builds produce the right ELF; host detection."""

import struct

import pytest
import zoo
from conftest import require_tool

import edgeq
import targets
from edgeq import EdgeqError
from targets.detect import cpu_features

ELF_MACHINE = {"x86_64": 62, "aarch64": 183, "arm": 40}
EF_ARM_ABI_FLOAT_HARD = 0x400


def elf_header(path):
    """(class 32/64, e_machine, e_flags) of an ELF file."""
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    bits = {1: 32, 2: 64}[data[4]]
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = struct.unpack_from("<I", data, 48 if bits == 64 else 36)[0]
    return bits, machine, flags


@pytest.mark.parametrize("preset", targets.all_presets(), ids=lambda p: p.name)
def test_every_preset_is_a_valid_tvm_target(preset):
    target = targets.tvm_target(preset)
    assert target.kind.name == preset.target["kind"]
    if preset.host:
        assert target.host.kind.name == "llvm"


def test_required_presets_exist():
    names = {p.name for p in targets.all_presets()}
    assert {"host", "x86-avx2", "x86-avx512", "rpi3", "rpi3-32", "rpi4", "rpi5", "android-arm64",
            "jetson-orin", "cuda-sm80", "cuda-sm89", "cuda-sm90"} <= names
    assert targets.PRESETS["rpi5"].target["mattr"] == ["+neon", "+dotprod"]
    assert targets.PRESETS["rpi3-32"].target["mfloat-abi"] == "hard"


def test_unknown_preset_and_bad_json():
    with pytest.raises(EdgeqError, match="unknown target 'rpi9'; presets: host, x86-avx2"):
        targets.resolve("rpi9")
    with pytest.raises(EdgeqError, match="neither a preset nor valid JSON"):
        targets.resolve("{kind: llvm")
    with pytest.raises(EdgeqError, match="invalid TVM target .*bogus"):
        targets.tvm_target(targets.resolve('{"kind": "llvm", "bogus": 1}'))


def test_raw_target_json_picks_the_cross_toolchain():
    preset = targets.resolve({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"})
    assert (preset.name, preset.arch, preset.compiler) == ("custom", "aarch64", "aarch64-linux-gnu-gcc")


def test_cpu_features_from_cpuinfo():
    x86 = "processor : 0\nflags : fpu sse avx2 fma avx512f avx512_vnni avx512_vpopcntdq\n"
    assert cpu_features(x86) == ("avx2", "avx512_vnni", "avx512_vpopcntdq", "avx512f", "fma")
    pi5 = "processor : 0\nFeatures : fp asimd evtstrm aes crc32 asimddp\n"
    assert cpu_features(pi5) == ("dotprod", "neon")


def test_host_preset_describes_this_machine():
    host = targets.resolve("host")
    assert host.target["num-cores"] >= 1 and host.arch in ELF_MACHINE
    assert host.target.get("mcpu") != "native"


@pytest.mark.parametrize("preset, bits, hard_float", [("rpi4", 64, False), ("rpi5", 64, False),
                                                      ("rpi3-32", 32, True)])
def test_cross_build_produces_device_elf(preset, bits, hard_float, tmp_path):
    require_tool(targets.PRESETS[preset].compiler)
    artifact = edgeq.build(zoo.ZOO["conv"](), preset, tmp_path / preset)
    assert artifact.manifest["library"]["kind"] == "shared"
    elf_bits, machine, flags = elf_header(artifact.library)
    assert (elf_bits, machine) == (bits, ELF_MACHINE[targets.PRESETS[preset].arch])
    assert bool(flags & EF_ARM_ABI_FLOAT_HARD) == hard_float
    with pytest.raises(EdgeqError, match="built for .* run it on the device"):
        artifact.run(zoo.random_inputs(zoo.ZOO["conv"]()))


def test_android_without_ndk_ships_objects(tmp_path, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    artifact = edgeq.build(zoo.ZOO["conv"](), "android-arm64", tmp_path / "android")
    library = artifact.manifest["library"]
    assert (library["file"], library["kind"]) == ("model.tar", "objects")
    assert "Android NDK" in library["note"] and "ANDROID_NDK_HOME" in library["note"]
    with pytest.raises(EdgeqError, match="holds object files"):
        artifact.run(zoo.random_inputs(zoo.ZOO["conv"]()))


def test_android_links_with_the_ndk_compiler_it_is_given(tmp_path, monkeypatch):
    """TVM_NDK_CC names the NDK's clang; a wrapper around the aarch64 cross gcc stands in for it here (the NDK
    is not downloadable on this machine), so what is checked is that edgeq links model.so with that compiler."""
    cross = require_tool("aarch64-linux-gnu-gcc")
    log = tmp_path / "ndk-calls.log"
    wrapper = tmp_path / "aarch64-linux-android24-clang"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {cross} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.setenv("TVM_NDK_CC", str(wrapper))
    artifact = edgeq.build(zoo.ZOO["conv"](), "android-arm64", tmp_path / "android")
    library = artifact.manifest["library"]
    assert (library["file"], library["kind"], library["linker"]) == ("model.so", "shared", wrapper.name)
    assert elf_header(artifact.library)[:2] == (64, ELF_MACHINE["aarch64"])
    assert "-shared" in log.read_text()


@pytest.mark.parametrize("preset, arch", [("cuda-sm80", "x86_64"), ("jetson-orin", "aarch64")])
def test_cuda_build_generates_kernels_that_nvcc_compiles(preset, arch, tmp_path):
    import tvm

    if preset == "jetson-orin":
        require_tool("aarch64-linux-gnu-gcc")
    require_tool("nvcc")
    artifact = edgeq.build(zoo.ZOO["conv"](), preset, tmp_path / preset)
    cuda = artifact.manifest["cuda"]
    assert cuda["arch"] == targets.PRESETS[preset].target["arch"] and cuda["source_bytes"] > 0
    assert cuda["nvcc_check"].startswith("ok: ") and cuda["nvcc_check"].endswith(f"{cuda['arch']} fatbin")
    assert b"__global__" in artifact.library.read_bytes()
    assert elf_header(artifact.library)[1] == ELF_MACHINE[arch]
    if not tvm.cuda(0).exist:
        with pytest.raises(EdgeqError, match="needs a CUDA GPU|built for"):
            artifact.run(zoo.random_inputs(zoo.ZOO["conv"]()))
