#!/usr/bin/env bash
# The whole study on a folder of face images at 32 px on CPU, ending in one table.
# Its rows: the baseline (DDIM), discriminator guidance, and adversarial fine-tuning
# variants (chain through all steps, chain through the last K steps, steps mode, and
# output blocks against LoRA). All rows use the same seeds and the same number of
# sampling steps, and 04_eval.py evaluates them with bootstrap intervals.
#
#   bash recipe_faces.sh FACE_DIR [OUT_DIR] [key=value ...]
#
# Environment knobs (defaults sized to finish within an hour on 2 CPU cores):
#   MODEL=DIR         reuse a pretrained model folder instead of running 00_pretrain.py
#   PRETRAIN_STEPS    00 steps (default 1000)
#   NUM               images per evaluated set (default 300)
#   REAL_MAX          reference images for the metrics (default 1000)
#   FT_STEPS          generator steps per fine-tuning variant (default 30)
#   WEIGHTS           discriminator guidance weights (default [2])
#   BATCH             sample.batch_per_gpu (default 150 with the CPU config, so that the 300
#                     images run as two batches in parallel on 2 cores; else the config's)
#   CONFIG            base config (default configs/celeba32_cpu.yaml; use
#                     configs/celebahq256.yaml with MODEL unset on GPUs)
#   PYTHON, LAUNCH    interpreter, or a launcher such as "torchrun --nproc_per_node=8"
#   DRY_RUN=1         only check every stage's config (each prints it and exits)
# The fine-tuning runs skip their own periodic evaluation (adv.eval_every=0): 04_eval.py
# samples every exported model once with the seeds of the baseline. Reference statistics
# are cached in OUT_DIR/cache, so a rerun into a new OUT_DIR pays for them again.
set -euo pipefail
cd "$(dirname "$0")"
faces="${1:?usage: bash recipe_faces.sh FACE_DIR [OUT_DIR] [key=value ...]}"
out="${2:-runs/faces32}"
shift $(( $# >= 2 ? 2 : 1 ))
config="${CONFIG:-configs/celeba32_cpu.yaml}"
launch="${LAUNCH:-${PYTHON:-python}}"
num="${NUM:-300}"
ft_steps="${FT_STEPS:-30}"
weights="${WEIGHTS:-[2]}"
start=$(date +%s)
batch="${BATCH:-}"
if [ -z "$batch" ] && [ "$config" = configs/celeba32_cpu.yaml ]; then batch=150; fi
base=(data.root="$faces" sample.num="$num" metrics.real_max="${REAL_MAX:-1000}" metrics.cache_dir="$out/cache"
      metrics.c2st_steps=200 ${batch:+sample.batch_per_gpu=$batch} "$@")

stage() {
  local name="$1"; shift
  echo
  echo "=== $name ($(( $(date +%s) - start )) s elapsed) ==="
  $launch "$@" ${DRY_RUN:+--dry-run}
}

model="${MODEL:-$out/pretrain/model}"
if [ -z "${MODEL:-}" ]; then
  stage "00 pretrain" 00_pretrain.py "$config" run_dir="$out/pretrain" train.steps="${PRETRAIN_STEPS:-1000}" "${base[@]}"
fi
stage "01 baseline (DDIM)" 01_baseline.py "$config" run_dir="$out/baseline" model.pretrained="$model" "${base[@]}"
stage "02 noise-aware discriminator" 02_train_disc.py "$config" run_dir="$out/disc_noisy" model.pretrained="$model" \
  disc.mode=noisy disc.mbstd_group=0 disc.fakes="$out/baseline/samples" disc.eval_num=$(( num / 3 )) "${base[@]}"
stage "01 discriminator guidance sweep" 01_baseline.py "$config" run_dir="$out/guided" model.pretrained="$model" \
  guidance.disc="$out/disc_noisy/disc_final.pt" "guidance.weights=$weights" "guidance.t_range=[0,600]" "${base[@]}"

finetune() {
  local name="$1"; shift
  stage "03 fine-tune: $name" 03_adv_finetune.py "$config" run_dir="$out/ft_$name" model.pretrained="$model" \
    adv.disc_ckpt="$out/disc_noisy/disc_final.pt" disc.mode=noisy disc.mbstd_group=0 adv.steps_total="$ft_steps" \
    adv.eval_every=0 "$@" "${base[@]}"
}
finetune chain_all adv.mode=chain adv.grad_steps=all
finetune chain_k2 adv.mode=chain adv.grad_steps=2
finetune steps adv.mode=steps
finetune chain_k2_out2 adv.mode=chain adv.grad_steps=2 "adv.trainable={output_blocks: 2}"
finetune chain_k2_lora adv.mode=chain adv.grad_steps=2 \
  "adv.trainable={lora: {rank: 8, alpha: 8, target_modules: [to_q, to_k, to_v, conv1, conv2]}}"

runs="$out/baseline,$out/guided,$out/ft_chain_all,$out/ft_chain_k2,$out/ft_steps,$out/ft_chain_k2_out2,$out/ft_chain_k2_lora"
stage "04 evaluation table" 04_eval.py "$config" run_dir="$out/eval" "runs=[$runs]" eval.baseline=baseline "${base[@]}"

echo
echo "done in $(( $(date +%s) - start )) s; table: $out/eval/results.md; paired differences: $out/eval/paired.md"
