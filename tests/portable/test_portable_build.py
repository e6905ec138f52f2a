"""The installed llama.cpp runs on any x86-64 CPU with AVX2: no AVX-512, AMX or VNNI code.

A wheel compiled with -march=native on a Xeon with AMX died with SIGILL (`tilezero` in
libggml-cpu.so) on the next machine; these tests disassemble what is installed. The checker
itself is proven on objects compiled here with -mavx512f and -mamx-tile.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.portable.isa import forbidden_instructions

x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instructions"
)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

VECTOR_LOOP = """
void scale(float *restrict out, const float *restrict in, float k, int n) {
    for (int i = 0; i < n; i++) out[i] = in[i] * k;
}
"""
AMX_TILE = """
#include <immintrin.h>
void zero_tile(void) { _tile_zero(0); _tile_release(); }
"""


def llama_libraries() -> list[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations, "llama-cpp-python missing"
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    # The wheel holds libX.so, libX.so.0 and libX.so.0.N.M as identical copies: one of each.
    return sorted(lib.glob("lib*.so"))


def compile_object(tmp_path: Path, source: str, *flags: str) -> Path:
    name = "probe" + "".join(flags).replace("-", "_").replace("=", "_")
    c_file, obj = tmp_path / f"{name}.c", tmp_path / f"{name}.o"
    c_file.write_text(source, encoding="utf-8")
    subprocess.run(["gcc", "-O3", "-c", *flags, str(c_file), "-o", str(obj)], check=True)
    return obj


@x86_only
def test_installed_llama_cpp_has_no_instructions_beyond_avx2() -> None:
    libraries = llama_libraries()
    names = [path.name for path in libraries]
    assert any(name.startswith("libggml-cpu") for name in names), names
    found = {path.name: forbidden_instructions(path) for path in libraries}
    assert {name: dict(hits) for name, hits in found.items() if hits} == {}


@x86_only
@needs_gcc
def test_the_checker_sees_avx512(tmp_path: Path) -> None:
    portable = compile_object(tmp_path, VECTOR_LOOP, "-mavx2", "-mfma")
    native512 = compile_object(tmp_path, VECTOR_LOOP, "-mavx512f", "-mprefer-vector-width=512")
    assert not forbidden_instructions(portable)
    assert any(hit.startswith("%zmm") for hit in forbidden_instructions(native512))


@x86_only
@needs_gcc
def test_the_checker_sees_amx(tmp_path: Path) -> None:
    amx = compile_object(tmp_path, AMX_TILE, "-mamx-tile")
    assert "tilezero" in forbidden_instructions(amx)


# --- The wheel cache: keyed by the version and every flag ----------------------------------------

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "llama-wheel.sh"


def cache_key(version: str, cmake_args: str | None = None, script: Path = SCRIPT) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if cmake_args is not None:
        env["LLAMA_CMAKE_ARGS"] = cmake_args
    done = subprocess.run(
        ["bash", str(script), "key", "/nonexistent-venv", version],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout.strip()


def test_a_wheel_built_with_other_flags_or_version_is_never_picked_up(tmp_path: Path) -> None:
    default = cache_key("0.3.36")
    native = cache_key("0.3.36", "-DGGML_NATIVE=ON")
    assert len(default) == 16
    assert len({default, native, cache_key("0.3.35"), cache_key("0.3.36", "-DGGML_AVX=ON")}) == 4
    assert cache_key("0.3.36") == default  # stable
    # Another clone in another folder computes the same key (the path is not part of it).
    copy = tmp_path / "elsewhere" / "scripts"
    shutil.copytree(SCRIPT.parent, copy)
    assert cache_key("0.3.36", script=copy / SCRIPT.name) == default


def test_the_build_bypasses_pips_cache_and_prebuilt_wheels() -> None:
    text = SCRIPT.read_text(encoding="utf-8")
    build = next(line for line in text.splitlines() if '"$venv/bin/pip" wheel' in line)
    following = text[text.index(build) :].split("\n", 3)[:3]
    command = " ".join(following)
    assert "--no-cache-dir" in command and "--no-binary llama-cpp-python" in command
    assert "-DGGML_NATIVE=OFF" in text and "-DGGML_AVX512" not in text
