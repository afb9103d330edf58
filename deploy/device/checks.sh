#!/usr/bin/env bash
# On a lent CUDA machine, in one call (prepared by deploy/device/prepare.sh; carry [".device"]):
#   cards  issue #9: `bench card` capped at an RTX 4090's and an RTX 5090's memory, and `bench fp8`
#   farm   issue #13: the full-size random model written once, then `bench farm` (our farm against
#          the plain Celery farm) on that card
#   all    both (longer than one 10-minute call: run cards and farm as two calls)
# --cpu: the same steps on this machine's CPU with small shapes (the dry run before the real call).
# Each step's JSON and the GPU's name go to $OUT (at most 8 files come back); logs to $OUT/logs.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
phase=${1:-cards}
cpu=${2:-}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
site=${DEVICE_SITE:-/tmp/kleinfarm-site}
python=${DEVICE_PYTHON_BIN:-python3}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .device/wheels/*.whl || exit 3
"$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" . \
  2> "$OUT/logs.txt" || { cat "$OUT/logs.txt"; exit 3; }
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 PATH="$PWD/.device/redis:$PATH"
export LD_LIBRARY_PATH="$PWD/.device/redis/lib:${LD_LIBRARY_PATH:-}"
log="$OUT/logs.txt"  # begun by the install above
kleinfarm=("$python" -m kleinfarm.producer)
step() {  # step NAME SECONDS COMMAND...: its stdout (JSON lines) to $OUT/NAME.json, the rest to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* (limit ${limit}s)" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$log"
  echo "== $name: rc=$? in $((SECONDS - started)) s" | tee -a "$log"
  tail -n 4 "$OUT/$name.json"
}
{
  redis-server --version
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  if [[ -z "$cpu" ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [[ -n "$cpu" ]]; then
  device=cpu shapes=tiny farm_args=(--devices cpu --jobs 12 --sets 2 --size 256 --ref-px 256)
else
  device=cuda shapes=full farm_args=(--devices cuda:0 --jobs 60 --size 1024 --ref-px 1024)
fi
if [[ "$phase" == cards || "$phase" == all ]]; then
  step card-rtx4090 200 "${kleinfarm[@]}" bench card --card rtx4090 --shapes "$shapes" --device "$device"
  step card-rtx5090 200 "${kleinfarm[@]}" bench card --card rtx5090 --shapes "$shapes" --device "$device"
  step fp8 150 "${kleinfarm[@]}" bench fp8 --shapes "$shapes" --device "$device"
fi
if [[ "$phase" == farm || "$phase" == all ]]; then
  model=/tmp/kleinfarm-random-"$shapes"
  [[ -d "$model" ]] || step random-model 180 "${kleinfarm[@]}" make-random-model "$model" --shape "$shapes" --device "$device"
  step farm 380 "${kleinfarm[@]}" bench farm "${farm_args[@]}" --model "$model"
fi
