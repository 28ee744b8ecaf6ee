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
# The CPU's vector extensions, named one by one rather than -march=native: AMX stays off, since a
# VM may list it in cpuid without enabling its register state (llama-server then dies of SIGILL).
CPU_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
isa() { case "$CPU_FLAGS" in *" $1 "*) echo "-D$2=ON" ;; *) echo "-D$2=OFF" ;; esac; }
ISA="$(isa avx GGML_AVX) $(isa avx2 GGML_AVX2) $(isa fma GGML_FMA) $(isa f16c GGML_F16C) $(isa avx_vnni GGML_AVX_VNNI)
     $(isa avx512f GGML_AVX512) $(isa avx512vbmi GGML_AVX512_VBMI) $(isa avx512_vnni GGML_AVX512_VNNI)
     $(isa avx512_bf16 GGML_AVX512_BF16)"
if [ ! -x "$LLAMA/build/bin/llama-server" ] || ! grep -q "GGML_NATIVE:BOOL=OFF" "$LLAMA/build/CMakeCache.txt"; then
  # shellcheck disable=SC2086
  cmake -S "$LLAMA" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_NATIVE=OFF $ISA -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$LLAMA/build" --target llama-server -j "$(nproc)"
fi
echo "llama-server: $LLAMA/build/bin/llama-server"
if [ $# -ge 1 ]; then
  HF="$1"; OUT="${2:-$DIR/$(basename "$HF")-bf16.gguf}"
  if [ ! -f "$OUT" ]; then
    # A venv of its own for the converter's requirements (its gguf-py is the vendored one).
    if [ ! -x "$DIR/convert-venv/bin/python" ]; then
      python3 -m venv --system-site-packages "$DIR/convert-venv"
      "$DIR/convert-venv/bin/pip" install --quiet sentencepiece
    fi
    PYTHONPATH="$LLAMA/gguf-py" "$DIR/convert-venv/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$HF" \
      --outtype bf16 --outfile "$OUT"
  fi
  echo "bf16 gguf: $OUT"
fi
