#!/usr/bin/env bash
# The two LoRA sync modes side by side on the CPU end-to-end run (train_grpo_tiny.sh): for each
# mode and learning rate, one whole tiny run (about 3.5 minutes on 2 cores), then
# bench/plot_sync_modes.py, which prints the per-step engine-vs-trainer KL and served share and
# writes bench/results/sync_modes_tiny.{json,png}.
#
#   bash bench/sync_modes_tiny.sh
#   LRS="5e-6 2e-3" MODES="merged native" bash bench/sync_modes_tiny.sh
#
# LR 5e-6 puts the intended update |delta| / |W0| of the tiny model's q/k/v/o at 1e-4 to 1e-3
# over the run (the range where bf16 merging drops most of it); 2e-3 is the tiny launcher's own.
set -euo pipefail

LRS="${LRS:-5e-6 5e-5 2e-3}"
MODES="${MODES:-merged native}"
OUT_DIR="${OUT_DIR:-build/sync-modes}"
PYTHON="${PYTHON:-.venv/bin/python}"
RESULT="${RESULT:-bench/results/sync_modes_tiny}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
read -r -a lrs <<<"$LRS"
read -r -a modes <<<"$MODES"
folders=()
for lr in "${lrs[@]}"; do
  for mode in "${modes[@]}"; do
    run_dir="$PWD/$OUT_DIR/${mode}_${lr}"
    rm -rf "$run_dir"
    mkdir -p "$run_dir"
    echo "== RFT_LORA_SYNC=$mode LR=$lr -> $run_dir/log.txt"
    RFT_LORA_SYNC="$mode" LR="$lr" DATA_ROOT="$run_dir" SCRATCH_ROOT="$run_dir" PYTHON="$PYTHON" \
      bash train_grpo_tiny.sh "$@" >"$run_dir/log.txt" 2>&1
    folders+=("$run_dir"/rft_metrics/*/)
  done
done
"$PYTHON" bench/plot_sync_modes.py "${folders[@]}" --out "$RESULT"
