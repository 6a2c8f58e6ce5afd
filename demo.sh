#!/usr/bin/env bash
# Offline CPU demo of the whole pipeline on the 100 LFW face crops that scikit-image
# ships: 00 pretrain -> 01 baseline -> 02 noise-aware discriminator -> 03 adversarial
# fine-tuning -> 04 evaluation table. No download; a few minutes on 2 CPU cores.
#
#   bash demo.sh [OUT_DIR] [key=value ...]     (default OUT_DIR: runs/demo)
#
# Extra key=value overrides go to every stage (for example train.steps=50 for a
# quicker, worse run). Metrics use a fixed-seed random Inception network, so FID,
# KID and IS compare these runs with each other only, never with published numbers.
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-runs/demo}"
shift || true
python="${PYTHON:-python}"
config=configs/demo.yaml
start=$(date +%s)

stage() {
  local name="$1"; shift
  echo
  echo "=== $name ($(( $(date +%s) - start )) s elapsed) ==="
  "$python" "$@"
}

stage "00 pretrain a diffusion model" 00_pretrain.py "$config" run_dir="$out/pretrain" "$@"
stage "01 baseline samples and metrics" 01_baseline.py "$config" run_dir="$out/baseline" \
  model.pretrained="$out/pretrain/model" "$@"
stage "02 noise-aware discriminator" 02_train_disc.py "$config" run_dir="$out/disc" \
  model.pretrained="$out/pretrain/model" disc.mode=noisy disc.fakes="$out/baseline/samples" "$@"
stage "03 adversarial fine-tuning (chain, last 3 steps)" 03_adv_finetune.py "$config" run_dir="$out/finetune" \
  model.pretrained="$out/pretrain/model" adv.disc_ckpt="$out/disc/disc_final.pt" disc.mode=noisy \
  adv.mode=chain adv.grad_steps=3 "$@"
stage "04 evaluation table" 04_eval.py "$config" run_dir="$out/eval" \
  runs="[$out/baseline,$out/finetune]" eval.labels="[baseline,finetune]" eval.baseline=baseline "$@"

echo
echo "done in $(( $(date +%s) - start )) s"
echo "table:            $out/eval/results.md"
echo "sample grids:     $out/baseline/grid.png, $out/finetune/grids/"
echo "before/after:     $out/eval/grids/pair_finetune.png"
echo "memorisation:     $out/eval/memorization/"
