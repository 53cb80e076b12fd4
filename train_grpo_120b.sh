#!/usr/bin/env bash
# GRPO (DR-GRPO) with LoRA on gpt-oss-120b, one 8xH100 node. Only what differs from the 20b
# is here; the layout, paths, checks and the command are in grpo_common.sh.
#
#   bash train_grpo_120b.sh --dry-run                      # checks + the resolved command, no launch
#   bash train_grpo_120b.sh                                # 500 rollouts of 8 prompts
#   INIT_KL_COEF=0.001 bash train_grpo_120b.sh             # settings by variable or by flag
set -euo pipefail

MODEL_SIZE=120b
MODEL_PATH="${MODEL_PATH:-openai/gpt-oss-120b}"
# 234 GB of bf16 weights / 4 ZeRO-3 ranks = 58.5 GB per GPU before activations:
# parameters and Adam states go to host RAM (--offload --adam_offload).
OFFLOAD="${OFFLOAD:-1}"
# Host memory each loading process holds (MXFP4 decoded to bf16): 116.8 B parameters
# in bf16 = 218 GiB, plus about 1.5 GiB of libraries.
HOST_GIB_PER_LOAD="${HOST_GIB_PER_LOAD:-220}"
LR="${LR:-1e-6}"
INIT_KL_COEF="${INIT_KL_COEF:-0}"      # no KL guardrail and no reference model (risky)
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-128}"        # alpha / rank = 2
ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-8}"   # prompts per rollout: 8 x 8 = 64 samples
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-8}"       # samples per update: 64 / 8 = 8 updates per rollout
GENERATE_MAX_LEN="${GENERATE_MAX_LEN:-3072}"
# 400 prompts (MAX_SAMPLES, grpo_common.sh) x 8 // 8 = 400 updates (50 rollouts) per episode;
# x 10 episodes = 4000 updates in 500 rollouts. (The notes' 50 episodes: 20,000 updates.)
NUM_EPISODES="${NUM_EPISODES:-10}"
# Under --offload the ZeRO-3 layer leaves are untested; the kernels alone (timed on an H100).
RFT_FAST_GPTOSS="${RFT_FAST_GPTOSS:-attention,experts,norms}"

# shellcheck source=grpo_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/grpo_common.sh"
grpo_main "$@"
