#!/usr/bin/env bash
# llama.cpp's server, built with cmake from the copy vendored in the llama-cpp-python sdist, under
# the peers cache dir; its converter then writes a bf16 GGUF of a dequantised HF folder (argument 1).
set -euo pipefail
DIR="${TOKENMILL_PEERS_DIR:-$HOME/.cache/tokenmill/peers}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
SRC="$DIR/llama_cpp_python-$VERSION"
mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
  tar -xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
LLAMA="$SRC/vendor/llama.cpp"
if [ ! -x "$LLAMA/build/bin/llama-server" ]; then
  cmake -S "$LLAMA" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$LLAMA/build" --target llama-server -j "$(nproc)"
fi
echo "llama-server: $LLAMA/build/bin/llama-server"
if [ $# -ge 1 ]; then
  HF="$1"; OUT="${2:-$DIR/$(basename "$HF")-bf16.gguf}"
  if [ ! -f "$OUT" ]; then
    # A venv of its own for the converter's requirements (its gguf-py is the vendored one).
    [ -x "$DIR/convert-venv/bin/python" ] || python3 -m venv --system-site-packages "$DIR/convert-venv"
    PYTHONPATH="$LLAMA/gguf-py" "$DIR/convert-venv/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$HF" \
      --outtype bf16 --outfile "$OUT"
  fi
  echo "bf16 gguf: $OUT"
fi
