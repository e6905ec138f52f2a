#!/usr/bin/env bash
# Build llama-cpp-python once for any x86-64 CPU with AVX2 and install it into a virtualenv.
#
# Why not plain `pip install`: pip compiles llama.cpp with -march=native and keeps the wheel in
# its shared cache, so a wheel built on a CPU with AVX-512/AMX is later reused on one without
# them and dies with SIGILL on the first message. Here the wheel is built with --no-cache-dir
# into .cache/wheels/<key>/, the key being a hash of the version AND the CMake flags: a wheel
# built with other flags (or pip's cached native one) is never picked up.
#
# usage: scripts/llama-wheel.sh build|install|key VENV VERSION
#   build    compile the wheel into the cache unless it is there (runs beside other installs)
#   install  install it into VENV with its dependencies (numpy, jinja2, diskcache)
#   key      print the cache key of these flags and version
# env:   LLAMA_CMAKE_ARGS  the CPU flags (default: portable AVX2, see README "CPU requirements")
#        LLAMA_WHEEL       a prebuilt wheel to install instead of building one (trusted as is)
set -euo pipefail

mode=$1
venv=$2
version=$3
cache_root=${LLAMA_WHEEL_CACHE:-.cache/wheels}
default_cpu_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
cpu_args=${LLAMA_CMAKE_ARGS:-$default_cpu_args}
# Only what the worker uses: the library itself, no multimodal (mtmd/llava), tools, tests,
# examples or server (each would add minutes of compiling on 2 cores).
only_lib="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
only_lib="$only_lib -DGGML_CCACHE=OFF"
here=$(cd "$(dirname "$0")" && pwd)
lib_only="$here/llama-lib-only.cmake"
cmake_args="$cpu_args $only_lib -DCMAKE_PROJECT_llama.cpp_INCLUDE=$lib_only"
# The key: the version, the flags and the include file's text (not its path, so two clones
# in different folders agree).
key=$( { printf 'llama-cpp-python==%s\n%s\n' "$version" "$cpu_args $only_lib"; cat "$lib_only"; } \
  | sha256sum | cut -c1-16)
marker="$venv/.llama-wheel-$key"

if [ "$mode" = key ]; then  # for the tests: which cache folder these flags use
  echo "$key"
  exit 0
fi

if [ -e "$marker" ]; then
  exit 0  # installed with these flags: nothing to say
fi
if [ "$mode" = build ]; then
  echo "[2/5] llama.cpp for any x86-64 CPU with AVX2 (compiled once: about 3 min on 2 idle cores, more on a busy machine; cached in .cache/wheels)"
fi

find_wheel() {
  if [ -n "${LLAMA_WHEEL:-}" ]; then
    echo "$LLAMA_WHEEL"
  else
    ls "$cache_root/$key"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true
  fi
}

if [ "$mode" = install ]; then
  wheel=$(find_wheel)
  [ -n "$wheel" ] || { echo "no llama-cpp-python wheel for $key: run the build first" >&2; exit 1; }
  "$venv/bin/pip" install --no-cache-dir --no-deps --force-reinstall --disable-pip-version-check \
    --quiet "$wheel"
  "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet "$wheel"
  rm -f "$venv"/.llama-wheel-*
  touch "$marker"
  echo "      llama-cpp-python $version installed from $wheel"
  exit 0
fi

wheel=$(find_wheel)
if [ -n "$wheel" ]; then
  echo "      using $wheel"
  exit 0
fi

dir="$cache_root/$key"
echo "      compiling with: $cmake_args"
echo "      (full log: $dir.log; progress below every ~10%)"
mkdir -p "$cache_root"
rm -rf "$dir.tmp"
start=$(date +%s)
# --no-binary: never a prebuilt wheel from an index; --no-cache-dir: never pip's cache.
CMAKE_ARGS="$cmake_args" "$venv/bin/pip" wheel --no-cache-dir --no-deps \
  --disable-pip-version-check --no-binary llama-cpp-python -v \
  --wheel-dir "$dir.tmp" "llama-cpp-python==$version" >"$dir.log" 2>&1 &
build=$!
last=-1
while kill -0 "$build" 2>/dev/null; do
  sleep 5
  step=$(grep -aoE '^ *\[ *[0-9]+/[0-9]+\]' "$dir.log" | tail -n1 | tr -d '[] ' || true)
  if [ -n "$step" ]; then
    pct=$(( ${step%/*} * 100 / ${step#*/} ))
    if [ $((pct / 10)) -gt "$last" ]; then
      last=$((pct / 10))
      echo "      compiled $step files ($pct%, $(( $(date +%s) - start )) s)"
    fi
  fi
done
if ! wait "$build"; then
  tail -n 30 "$dir.log"
  echo "llama-cpp-python did not build; the log is $dir.log" >&2
  exit 1
fi
printf 'llama-cpp-python==%s\nCMAKE_ARGS=%s\n' "$version" "$cpu_args $only_lib" >"$dir.tmp/flags.txt"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "      built in $(( $(date +%s) - start )) s: $(find_wheel)"
