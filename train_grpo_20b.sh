#!/usr/bin/env bash
# GRPO (DR-GRPO) with LoRA on gpt-oss-20b, one 8xH100 node. Only what differs from the 120b
# is here; the layout, paths, checks and the command are in grpo_common.sh.
#
#   bash train_grpo_20b.sh --dry-run                       # checks + the resolved command, no launch
#   bash train_grpo_20b.sh                                 # ~4 days: 500 rollouts of 16 prompts
#   LR=1e-6 bash train_grpo_20b.sh --eps_clip 0.2          # settings by variable or by flag
set -euo pipefail

MODEL_SIZE=20b
MODEL_PATH="${MODEL_PATH:-openai/gpt-oss-20b}"
# 84 GB of bf16 weights / 4 ZeRO-3 ranks = 21 GB per GPU: no CPU offload needed.
OFFLOAD="${OFFLOAD:-0}"
# Host memory each loading process holds (MXFP4 decoded to bf16): 20.9 B parameters
# in bf16 = 39 GiB, plus about 1.5 GiB of libraries.
HOST_GIB_PER_LOAD="${HOST_GIB_PER_LOAD:-41}"
LR="${LR:-5e-7}"                       # start low; raise if learning is flat after 20 episodes
INIT_KL_COEF="${INIT_KL_COEF:-0.001}"  # a light guardrail; > 0 also loads the reference model
LORA_RANK="${LORA_RANK:-32}"
LORA_ALPHA="${LORA_ALPHA:-64}"         # alpha / rank = 2
ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-16}"  # prompts per rollout: 16 x 8 = 128 samples
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-16}"      # samples per update: 128 / 16 = 8 updates per rollout
GENERATE_MAX_LEN="${GENERATE_MAX_LEN:-4096}"    # raise when more than 70% of answers are truncated
# 400 prompts (MAX_SAMPLES, grpo_common.sh) x 8 // 16 = 200 updates (25 rollouts) per episode;
# x 20 episodes = 4000 updates in 500 rollouts, about 4 days at 10-13 min per rollout.
NUM_EPISODES="${NUM_EPISODES:-20}"

# shellcheck source=grpo_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/grpo_common.sh"
grpo_main "$@"
