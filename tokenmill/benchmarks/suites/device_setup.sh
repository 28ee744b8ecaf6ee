# Sourced by the device suites, from the repo root:  source "$(dirname "$0")/device_setup.sh" DEFAULT_OUT
# Sets $out (absolute: $OUT, the device tool's return folder, else DEFAULT_OUT), the Python
# environment, installs the carried wheels (wheels/: msgspec, gguf, pyzmq, pytest-timeout for
# Python 3.12, `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 NAME -d wheels`) into /tmp/tm_wheels, and writes the GPU to $out/device.txt.
out="${OUT:-$1}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: some parts run from another directory
export PYTHONPATH=.:/tmp/tm_wheels PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G "wheels/*.whl" >/dev/null; then
  pip install --quiet --no-deps --no-index --target /tmp/tm_wheels wheels/*.whl 2>&1 | tail -1
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"
