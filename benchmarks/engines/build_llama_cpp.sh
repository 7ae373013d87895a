#!/usr/bin/env bash
# Build llama.cpp (a test tool for `upcycle verify --engine llama.cpp` and tests/test_engine_llama_cpp.py,
# never a dependency) from the MIT `llama-cpp-python` sdist, which vendors the whole llama.cpp tree
# (convert_hf_to_gguf.py, gguf-py). The build is cached OUTSIDE the clone and reused; the script prints
# the tree's path (DIR, holding convert_hf_to_gguf.py and build/bin/llama-completion) on its last line.
#   UPCYCLE_LLAMA_CPP_CACHE  where the tree lives (default ~/.cache/upcycle/llama.cpp-<version>)
#   UPCYCLE_LLAMA_CPP_JOBS   parallel compile jobs (default 2)
#   PYTHON                   the python whose pip downloads the sdist (default python3)
set -euo pipefail
VERSION="${UPCYCLE_LLAMA_CPP_PY_VERSION:-0.3.36}"
DEST="${UPCYCLE_LLAMA_CPP_CACHE:-$HOME/.cache/upcycle/llama.cpp-$VERSION}"
JOBS="${UPCYCLE_LLAMA_CPP_JOBS:-2}"
PY="${PYTHON:-python3}"
# The converter's Llama/Mixtral vocabulary path imports sentencepiece: installed beside the tree (pydeps/),
# never into the environment that runs it.
pydeps() {
  [ -d "$1/pydeps/sentencepiece" ] || "$PY" -m pip install --quiet --no-deps --target "$1/pydeps" sentencepiece >&2
}
if [ -x "$DEST/build/bin/llama-completion" ] && [ -f "$DEST/convert_hf_to_gguf.py" ]; then
  pydeps "$DEST"; echo "$DEST"; exit 0
fi
WORK="$(mktemp -d "${DEST%/*}/.build-XXXXXX" 2>/dev/null || { mkdir -p "${DEST%/*}"; mktemp -d "${DEST%/*}/.build-XXXXXX"; })"
trap 'rm -rf "$WORK"' EXIT
SDIST="${UPCYCLE_LLAMA_CPP_SDIST:-}"
if [ -z "$SDIST" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK/dl" "llama-cpp-python==$VERSION" >&2
  SDIST="$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz)"
fi
tar -xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
start=$(date +%s)
nice -n 19 cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
nice -n 19 cmake --build "$SRC/build" --target llama-completion -j "$JOBS" >&2
echo "built llama-completion in $(( $(date +%s) - start )) s" >&2
pydeps "$SRC"
rm -rf "$DEST"
mv "$SRC" "$DEST"
echo "$DEST"
