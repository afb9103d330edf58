#!/usr/bin/env bash
# Before a call to a lent CUDA machine (the `device` tool; issues #9 and #13): gather, into .device/
# (ignored by git, carried by the call), what that machine's image lacks:
#   wheels/  the farm's dependencies for its Python (3.12, manylinux x86-64), less the packages the
#            image already holds (deploy/device/present.txt), plus the transformers release we test;
#   redis/   redis-server and the libraries a bare Ubuntu may lack (the machine reaches no network).
# Then the call: carry [".device"], command "bash deploy/device/checks.sh cards" (or farm).
# DEVICE_PYTHON=3.11 prepares for this machine's Python instead (the CPU dry run, checks.sh --cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${DEVICE_PYTHON:-3.12}
PIP=${PIP:-.venv/bin/pip}
rm -rf .device && mkdir -p .device/wheels .device/redis/lib
"$PIP" download -q --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/wheels -r deploy/device/requirements.txt
present=" $(tr '\n' ' ' < deploy/device/present.txt) "
for wheel in .device/wheels/*.whl; do
  name=$(basename "$wheel" | sed 's/-[0-9].*//' | tr '_A-Z' '-a-z')
  if [[ "$present" == *" $name "* && "$name" != transformers ]]; then rm "$wheel"; fi
done
redis=$(command -v redis-server)
cp "$redis" .device/redis/
for lib in liblzf.so.1 libjemalloc.so.2; do
  cp "$(ldd "$redis" | awk -v lib="$lib" '$1 == lib {print $3}')" .device/redis/lib/
done
du -sh .device/wheels .device/redis
