#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU) from the llama.cpp sources vendored in PyPI's llama-cpp-python sdist, into
# $cache/llama.cpp/bin/llama-server, when it is not there yet. The tests serve their exported tiny models with it
# (tests/test_mllm_remote.py). Only the llama-server target is built: about 10 CPU-minutes.
set -euo pipefail
cache=${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui
version=${LLMGA_LLAMA_CPP_PYTHON:-0.3.36}
dest="$cache/llama.cpp"
if [ -x "$dest/bin/llama-server" ] && [ "$(cat "$dest/version" 2>/dev/null)" = "$version" ]; then
  echo "llama-server $version already built: $dest/bin/llama-server"
  exit 0
fi
python=${PYTHON:-python3}
work="$dest/src-$version"
rm -rf "$work" && mkdir -p "$work"
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON > "$work/cmake.log" 2>&1 || { tail -50 "$work/cmake.log"; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" > "$work/build.log" 2>&1 || { tail -50 "$work/build.log"; exit 1; }
mkdir -p "$dest/bin"
cp "$work/build/bin/llama-server" "$dest/bin/llama-server"
echo "$version" > "$dest/version"
rm -rf "$work/build"
echo "built $dest/bin/llama-server"
