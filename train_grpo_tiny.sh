#!/usr/bin/env bash
# The whole GRPO loop on a CPU, in minutes: the launchers' own command (grpo_common.sh) scaled
# down to a tiny gpt-oss and a toy task (rft/tiny.py) whose reward must rise. Run it before
# renting a node. Only what differs from the 20b is here; what stands in for the GPU on a CPU
# is in rft/cpu_stand_ins.py.
#
#   bash setup_cpu.sh                        # once: the CPU environment in .venv
#   bash train_grpo_tiny.sh                  # about 4 min on 2 cores: 16 rollouts, reward 0.7 -> 0.85
#   bash train_grpo_tiny.sh --dry-run        # checks + the resolved command, no launch
#   RFT_LORA_SYNC=merged bash train_grpo_tiny.sh   # the merged sync instead of native LoRA
#
# What runs for real: a local Ray head with logical GPUs, the Ray job, openrlhf.cli.train_ppo_ray
# from a copy of OpenRLHF 0.9.3 patched by apply_patches.sh --target (build/tiny/site), 2 actor
# ranks of DeepSpeed ZeRO-3 (CPU accelerator, gloo) with LoRA and gradient checkpointing, the
# reference model, one vLLM 0.15.1 engine (CPU build) at tensor parallel 2, the LoRA sync through
# the Ray object store (native LoRA by default: vLLM serves the adapter; RFT_LORA_SYNC=merged
# merges it into the weights), reward_func_em.py, the eval every rollout, adapter checkpoints and the
# run logs that check_run.py reads.
set -euo pipefail

MODEL_SIZE=tiny
RFT_ROOT="${RFT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
TINY_DIR="${TINY_DIR:-$RFT_ROOT/build/tiny}"
PYTHON="${PYTHON:-$RFT_ROOT/.venv/bin/python}"
MODEL_PATH="${MODEL_PATH:-$TINY_DIR/model}"
OFFLOAD="${OFFLOAD:-0}"
HOST_GIB_PER_LOAD="${HOST_GIB_PER_LOAD:-1}"     # 0.6 M parameters; 1 GiB covers a process's load
# LoRA r8 on attention must move one answer token within 64 updates; 3e-3 and above made the
# response format collapse within a few rollouts (bf16 on two cores, seed 42).
LR="${LR:-2e-3}"
INIT_KL_COEF="${INIT_KL_COEF:-0.001}"           # as the 20b: > 0 runs the reference model and its KL
LORA_RANK="${LORA_RANK:-8}"
LORA_ALPHA="${LORA_ALPHA:-16}"                  # alpha / rank = 2, as the launchers
# 128 prompts (MAX_SAMPLES) x 8 samples // 32 per update = 32 updates per episode, 4 per rollout
# of 16 prompts; x 2 episodes = 64 updates in 16 rollouts.
ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-16}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-32}"
MAX_SAMPLES="${MAX_SAMPLES:-128}"
NUM_EPISODES="${NUM_EPISODES:-2}"
GENERATE_MAX_LEN="${GENERATE_MAX_LEN:-96}"      # a whole response is 48 tokens
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-128}"         # a prompt is about 100 tokens
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-8}"
WARMUP_RATIO="${WARMUP_RATIO:-0}"               # 64 updates: a warmup would spend the short run
EPS_CLIP="${EPS_CLIP:-0.2}"
# Sampling temperature 0.7 (the trainer scales its logits the same way): at 1.0 the tiny model
# samples broken Harmony markup often enough that those samples' gradients swamp the one answer
# token, and the reward stalled near its start (0.66 -> 0.73 in 16 rollouts; 0.70 -> 0.87 at 0.7).
TEMPERATURE="${TEMPERATURE:-0.7}"
REASONING_EFFORT="${REASONING_EFFORT:-low}"  # the effort the tiny model's warm start saw (rft/tiny.py)
# The 20b's fast parts but flex attention (without TorchDynamo, off on CPU, it runs its slow
# reference code): routed experts, one-op norms, one ZeRO-3 fetch per layer, and the policy's
# frozen layer weights kept whole within RFT_FAST_GPTOSS_RESIDENT_GIB (there is no GPU to take
# half of). RFT_FAST_GPTOSS=0 runs transformers' own layers.
RFT_FAST_GPTOSS="${RFT_FAST_GPTOSS:-experts,norms,leaves,resident}"
export RFT_FAST_GPTOSS_RESIDENT_GIB="${RFT_FAST_GPTOSS_RESIDENT_GIB:-1}"
PROMPT_DATA="${PROMPT_DATA:-$TINY_DIR/data/train.jsonl}"
EVAL_DATASET="${EVAL_DATASET-$TINY_DIR/data/eval.jsonl}"
EVAL_STEPS="${EVAL_STEPS:-1}"
SAVE_STEPS="${SAVE_STEPS:-1}"
DATA_ROOT="${DATA_ROOT:-$TINY_DIR/run}"
SCRATCH_ROOT="${SCRATCH_ROOT:-$TINY_DIR/run}"
MIN_FREE_GB_DATA="${MIN_FREE_GB_DATA:-1}"
MIN_FREE_GB_SCRATCH="${MIN_FREE_GB_SCRATCH:-1}"
# Layout: 2 actor ranks (the reference model beside them) + 1 engine x TP 2 = 4 logical GPUs.
ACTOR_GPUS_PER_NODE="${ACTOR_GPUS_PER_NODE:-2}"
VLLM_NUM_ENGINES="${VLLM_NUM_ENGINES:-1}"
VLLM_TP="${VLLM_TP:-2}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8275}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-16}"               # logical: Ray schedules by count, the OS shares the cores

# ---- the CPU: vLLM's CPU engine settings (vLLM reads them) and rft's stand-ins ------------
export RFT_CPU_STAND_INS=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"          # GiB of KV cache per engine
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}" # TP 2 on one NUMA node
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"                # no inductor compile at start

if [[ " $* " != *" --help "* && " $* " != *" -h "* ]]; then
  if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "train_grpo_tiny: $PYTHON not found; run bash setup_cpu.sh first (or set PYTHON)" >&2
    exit 1
  fi
  # The model, the task and the patched OpenRLHF copy (skipped when up to date).
  PYTHONPATH="$RFT_ROOT" "$PYTHON" -m rft.tiny "$TINY_DIR"
  # The launcher refuses a storage root that does not exist (a missing mount on a node); here
  # both are folders of the build.
  mkdir -p "$DATA_ROOT" "$SCRATCH_ROOT"
  export PYTHONPATH="$TINY_DIR/site:$RFT_ROOT/rft/cpu_site:$RFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# shellcheck source=grpo_common.sh
source "$RFT_ROOT/grpo_common.sh"
grpo_main --enforce_eager "$@"
