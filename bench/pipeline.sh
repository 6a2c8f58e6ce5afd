#!/usr/bin/env bash
# Wall time of each stage of the CPU recipe on real faces: 00 -> 01 -> 02 -> 03 -> 04.
#
#   bash bench/pipeline.sh [key=value ...]
#   FACES=DIR RUNS=DIR PYTHON=/path/to/python bench/pipeline.sh train.steps=300 sample.num=500
#
# Every stage runs with configs/celeba32_cpu.yaml, data.root=$FACES, the reduced step
# counts below, and then the key=value arguments of this script (later overrides win,
# so the arguments replace the defaults below). Stages write into $RUNS (default: a new
# temporary folder). Prints a table of stage and seconds at the end.
# Threads: OMP_NUM_THREADS defaults to 1, because on cores shared with other processes
# more threads made torch much slower (see docs/benchmarks.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
FACES="${FACES:-$ROOT/../shared/data/faces/celeba64}"
RUNS="${RUNS:-$(mktemp -d -t bench_pipeline.XXXXXX)}"
CONFIG="$ROOT/configs/celeba32_cpu.yaml"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ ! -d "$FACES" ]; then
  echo "error: face folder $FACES not found; set FACES=DIR to a folder of face images" >&2
  exit 1
fi

# Reduced step counts so the whole recipe takes minutes, not hours, on a 2-core CPU.
DEFAULTS=(
  "data.root=$FACES" data.max_images=2000
  train.steps=200 train.sample_every=0 train.ckpt_every=100
  sample.num=200 sample.steps=20 sample.batch_per_gpu=50
  disc.steps=100 disc.eval_every=50 disc.eval_num=100
  adv.steps_total=10 adv.eval_every=0 adv.ckpt_every=10 adv.batch_per_gpu=4
  metrics.bootstrap=10 metrics.c2st_steps=100 "metrics.cache_dir=$RUNS/cache"
)

echo "pipeline: config $CONFIG, runs in $RUNS, OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "date: $(date)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(getconf _NPROCESSORS_ONLN) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "versions: $("$PYTHON" -c 'from importlib.metadata import version as v; print(*(n + " " + v(n) for n in ("torch", "diffusers", "pytorch-fid")), sep=", ")')"
echo "overrides: ${DEFAULTS[*]} $*"

STAGES=()
SECONDS_TAKEN=()

run_stage() {
  local name="$1"
  shift
  local start end
  start=$(date +%s.%N)
  echo "--- $name: $*"
  "$PYTHON" "$ROOT/$name" "$CONFIG" "${DEFAULTS[@]}" "$@" > "$RUNS/${name%.py}.log" 2>&1 || {
    echo "error: $name failed; last lines of $RUNS/${name%.py}.log:" >&2
    tail -n 20 "$RUNS/${name%.py}.log" >&2
    exit 1
  }
  end=$(date +%s.%N)
  STAGES+=("$name")
  SECONDS_TAKEN+=("$(echo "$end - $start" | bc)")
}

cd "$ROOT"
run_stage 00_pretrain.py "run_dir=$RUNS/p32" "$@"
run_stage 01_baseline.py "run_dir=$RUNS/b32" "model.pretrained=$RUNS/p32/model" "$@"
run_stage 02_train_disc.py "run_dir=$RUNS/d32" "model.pretrained=$RUNS/p32/model" "disc.fakes=$RUNS/b32/samples" "$@"
run_stage 03_adv_finetune.py "run_dir=$RUNS/ft32" "model.pretrained=$RUNS/p32/model" \
  "adv.disc_ckpt=$RUNS/d32/disc_final.pt" "$@"
run_stage 04_eval.py "run_dir=$RUNS/eval" "runs=[$RUNS/b32,$RUNS/ft32]" "eval.baseline=$RUNS/b32" "$@"

echo
echo "| stage | seconds |"
echo "|---|---|"
total=0
for i in "${!STAGES[@]}"; do
  printf '| %s | %.1f |\n' "${STAGES[$i]}" "${SECONDS_TAKEN[$i]}"
  total=$(echo "$total + ${SECONDS_TAKEN[$i]}" | bc)
done
printf '| total | %.1f |\n' "$total"
