#!/usr/bin/env bash
# Pre-flight check of the LR schedule OpenRLHF 0.9.3 will build for a GRPO run.
#
#   EP=40 LR=1e-6 bash preflight_lr.sh      # the 20b run with other settings
#   bash preflight_lr.sh --json          # one JSON object for scripts
#   bash preflight_lr.sh --help          # every input, its variable and its default (or -h)
#
# Inputs (environment or options; defaults are train_grpo_20b.sh's values):
#   POOL  prompts in the pool (default: rows of data/sft_rl_pool.jsonl)   NS  samples per prompt (8)
#   TBS   train_batch_size in samples (16)   EP  episodes (20)   WARMUP  lr_warmup_ratio (0.01)
#   LR    actor learning rate (5e-7)         RBS rollout_batch_size in prompts (16)   MAX_EPOCHS (1)
#   MAX_SAMPLES  prompts kept from the pool, OpenRLHF's --max_samples (400)
# Exit status: 0 the schedule is fine, 1 it must not be launched (the reason and the fix
# are printed), 2 bad input. The arithmetic lives in rft/lr_schedule.py (standard library only).
set -euo pipefail

RFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

export POOL_FILE="${POOL_FILE:-$RFT_ROOT/data/sft_rl_pool.jsonl}"
PYTHONPATH="$RFT_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m rft.lr_schedule "$@"
