#!/usr/bin/env bash
# Per-layer cost of the patched actor under ZeRO-3 for each RFT_FAST_GPTOSS setting, on one GPU.
#
#   bash bench/actor_zero3_ladder.sh                         # gpt-oss-20b, settings 0, attention,experts and 1
#   MODEL=gpt-oss-120b bash bench/actor_zero3_ladder.sh
#   SETTINGS="attention,experts 1" OPENRLHF_ROOT=build/site bash bench/actor_zero3_ladder.sh
#
# Runs bench/bench_actor_mxfp4.py at two layer counts per setting (one process each, the
# checkpoint of a layer count built once and reused; each run ends with one step and one log-prob
# forward under bench/component_timer.py), then bench/summarize_actor_zero3.py, which prints the
# per-layer tables and writes them into bench/results/actor_breakdown_<model>.json.
# Settings: 0 = eager attention + transformers' experts; see rft/fast_gptoss.py for the parts.
set -euo pipefail

MODEL="${MODEL:-gpt-oss-20b}"
SETTINGS="${SETTINGS:-0 attention,experts 1}"
OUT_DIR="${OUT_DIR:-build/actor-zero3}"
STEPS="${STEPS:-4}"
PYTHON="${PYTHON:-python}"
OPENRLHF_ROOT="${OPENRLHF_ROOT:-}"   # a patched openrlhf tree; empty: the installed (patched) one

# The launchers' shape per model: prompt 1024 + GENERATE_MAX_LEN tokens, their LoRA rank.
case "$MODEL" in
  gpt-oss-20b) LAYERS="${LAYERS:-2 4}"; SEQ=5120; RESPONSE=4096; RANK=32 ;;
  gpt-oss-120b) LAYERS="${LAYERS:-1 2}"; SEQ=4096; RESPONSE=3072; RANK=64 ;;
  *) echo "actor_zero3_ladder.sh: MODEL=$MODEL: use gpt-oss-20b or gpt-oss-120b" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT_DIR"
root_args=()
if [[ -n "$OPENRLHF_ROOT" ]]; then
  root_args=(--openrlhf-root "$OPENRLHF_ROOT")
fi

read -r -a settings <<<"$SETTINGS"
read -r -a layer_counts <<<"$LAYERS"
for setting in "${settings[@]}"; do
  for layers in "${layer_counts[@]}"; do
    name="${MODEL}_${setting//,/+}_L${layers}"
    echo "== $name"
    "$PYTHON" bench/bench_actor_mxfp4.py --model "$MODEL" --layers "$layers" --batch 1 --seq "$SEQ" \
      --response "$RESPONSE" --lora-rank "$RANK" --gradient-checkpointing --steps "$STEPS" \
      --workdir "$OUT_DIR/ckpt_${MODEL}_L${layers}" --fast "$setting" --json-out "$OUT_DIR/$name.json" \
      --components "${root_args[@]}"
  done
done
"$PYTHON" bench/summarize_actor_zero3.py "$OUT_DIR" --model "$MODEL"
