#!/usr/bin/env bash
# Builds llama.cpp tools from the sources vendored in the llama-cpp-python source
# package (native CPU flags, as `pip install llama-cpp-python` builds them) into
# ~/.cache/llama-rs/llamacpp/build, once per tool, and prints the folder of the
# binaries (tools and examples alike: llama-lookup and llama-speculative-simple are
# examples). The anchors of our benchmarks: a few minutes on two cores.
#   usage: scripts/bench/build-llamacpp.sh TARGET...   (llama-bench, llama-server, ...)
#   LLAMA_CPP_JOBS  parallel build jobs (default: nproc)
set -euo pipefail
cache="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}/llamacpp"
version=0.3.36
missing=()
for t in "$@"; do
    [ -x "$cache/build/bin/$t" ] || missing+=("$t")
done
if [ "${#missing[@]}" -gt 0 ]; then
    mkdir -p "$cache"
    if [ ! -x "$cache/venv/bin/cmake" ]; then
        python3 -m venv "$cache/venv"
        "$cache/venv/bin/pip" install --quiet cmake
    fi
    if [ ! -d "$cache/llama_cpp_python-$version" ]; then
        # Only the package itself from source: its build tools come as wheels.
        "$cache/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$version" -d "$cache"
        tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache"
    fi
    "$cache/venv/bin/cmake" -S "$cache/llama_cpp_python-$version/vendor/llama.cpp" \
        -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_OPENSSL=OFF >&2
    "$cache/venv/bin/cmake" --build "$cache/build" -j "${LLAMA_CPP_JOBS:-$(nproc)}" --target "${missing[@]}" >&2
fi
echo "$cache/build/bin"
