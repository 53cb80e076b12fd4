#!/usr/bin/env bash
# Shared part of the GRPO launchers (sourced by train_grpo_20b.sh and train_grpo_120b.sh,
# which set only what differs per model and then call grpo_main "$@").
#
# Knobs (environment variables; every one has a default below):
#   paths    RFT_ROOT DATA_DIR PROMPT_DATA EVAL_DATASET DATA_ROOT SCRATCH_ROOT RUN_NAME
#            SAVE_PATH CKPT_PATH METRICS_LOG_DIR SAMPLES_LOG_DIR SPIKE_LOG_PATH LOG_FILE
#   layout   ACTOR_NUM_NODES ACTOR_GPUS_PER_NODE VLLM_NUM_ENGINES VLLM_TP VLLM_GPU_MEM_UTIL
#   rollout  N_SAMPLES MAX_SAMPLES WARMUP_RATIO MICRO_ROLLOUT_BATCH_SIZE PROMPT_MAX_LEN TEMPERATURE
#   prompt   REASONING_EFFORT PROMPT_DATE (rft/prompt_spec.py; eval_posthoc.py --manifest reuses them)
#   speed    RFT_FAST_GPTOSS RFT_FAST_GPTOSS_RESIDENT_GIB (rft/fast_gptoss.py)
#   sync     RFT_LORA_SYNC (native|merged) RFT_LORA_PRISTINE RFT_LORA_SCRATCH_MB (docs/weight_sync.md)
#   train    MICRO_TRAIN_BATCH_SIZE MAX_EPOCHS EPS_CLIP ENTROPY_LOSS_COEF ATTN_IMPLEMENTATION SEED
#   eval     EVAL_STEPS EVAL_TEMPERATURE EVAL_N_SAMPLES
#   ckpt     SAVE_STEPS MAX_CKPT_NUM
#   checks   APPLY_PATCHES MIN_FREE_GB_DATA MIN_FREE_GB_SCRATCH MAX_GPU_MEM_USED_MIB RFT_MEMINFO
#   ray      RAY_ADDRESS (a dashboard URL such as http://head:8265; unset: start a local head)
#            RAY_DASHBOARD_PORT RAY_STOP_ON_EXIT RAY_NUM_CPUS (logical CPUs of a local head)
#   tools    PYTHON (the interpreter that has openrlhf) RAY_BIN REWARD_FUNC
# Per model (train_grpo_<size>.sh): MODEL_PATH LR INIT_KL_COEF LORA_RANK LORA_ALPHA
#   ROLLOUT_BATCH_SIZE TRAIN_BATCH_SIZE GENERATE_MAX_LEN NUM_EPISODES OFFLOAD HOST_GIB_PER_LOAD
#
# Launcher options: --dry-run (every check that needs no GPU, print the command one flag a
# line, write run_manifest.json, exit 0), --help or -h. Every other argument goes to OpenRLHF
# after the defaults, so it wins: train_grpo_20b.sh --eps_clip 0.2 --actor_learning_rate 1e-6
# The whole command is read by OpenRLHF's own (patched) parser before anything is created;
# the checks and run_manifest.json use what it parsed.
# Exit status: 0 done (a dry run passed, or the job succeeded); 1 the job failed or could not be
# submitted; 2 a setting, argument or input file is wrong; 3 the machine is not ready (Python,
# patches, rft install, disk, host memory, GPUs, Ray). A refusal is one line on stderr.

: "${MODEL_SIZE:?grpo_common.sh is sourced by train_grpo_20b.sh or train_grpo_120b.sh, which set MODEL_SIZE}"

# ---- settings ---------------------------------------------------------------------------
RFT_ROOT="${RFT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
PYTHON="${PYTHON:-python3}"
RAY_BIN="${RAY_BIN:-}"
APPLY_PATCHES="${APPLY_PATCHES:-$RFT_ROOT/apply_patches.sh}"
# Exact-match reward, loaded by every vLLM engine actor from this path (--remote_rm_url).
REWARD_FUNC="${REWARD_FUNC:-$RFT_ROOT/reward_func_em.py}"

# Data written by prepare_sft_data.py (rows {"input", "label"}).
DATA_DIR="${DATA_DIR:-$RFT_ROOT/data}"
PROMPT_DATA="${PROMPT_DATA:-$DATA_DIR/sft_rl_pool.jsonl}"
# Built-in eval: the OOD probe with greedy pass@1 (temperature 0, one sample), every 5 rollouts.
# EVAL_DATASET= (empty) turns the built-in eval off.
EVAL_DATASET="${EVAL_DATASET-$DATA_DIR/probe_set_200_ood.jsonl}"
EVAL_STEPS="${EVAL_STEPS:-5}"
EVAL_TEMPERATURE="${EVAL_TEMPERATURE:-0.0}"
EVAL_N_SAMPLES="${EVAL_N_SAMPLES:-1}"

# Prompts used from the pool (--max_samples): its first 400, which prepare_sft_data.py makes
# the same prompts as data/sft_rl_pool_400.jsonl. With the whole 50k pool OpenRLHF would plan
# 500,000 updates for 20 episodes of the 20b, and stretch the warmup and the cosine over them:
# a 4-day job (~500 rollouts, ~4000 updates) would end inside the warmup. OpenRLHF applies the
# same cap to the eval set, so the launcher refuses an eval set longer than MAX_SAMPLES.
MAX_SAMPLES="${MAX_SAMPLES:-400}"
# Both default runs have 4000 updates: 0.01 x 4000 = 40 warmup updates, and the LR at update 20
# is 19/40 = 47.5% of the target. The notes' 0.05 (20b) and 0.03 (120b) would give 200 and 120
# warmup updates, 9.5% and 15.8% at update 20, which preflight_lr.sh refuses.
WARMUP_RATIO="${WARMUP_RATIO:-0.01}"

# Storage: checkpoints on the 1 TB NVMe, metrics and logs on the 5.9 TB scratch RAID.
DATA_ROOT="${DATA_ROOT:-/mnt/data}"
SCRATCH_ROOT="${SCRATCH_ROOT:-/mnt/scratch}"
RUN_NAME="${RUN_NAME:-gpt-oss-$MODEL_SIZE-grpo}"
SAVE_PATH="${SAVE_PATH:-$DATA_ROOT/rft_output/$RUN_NAME}"
CKPT_PATH="${CKPT_PATH:-$DATA_ROOT/rft_checkpoints/$RUN_NAME}"
METRICS_LOG_DIR="${METRICS_LOG_DIR:-$SCRATCH_ROOT/rft_metrics/$RUN_NAME}"
SAMPLES_LOG_DIR="${SAMPLES_LOG_DIR:-$SCRATCH_ROOT/rft_samples/$RUN_NAME}"
SPIKE_LOG_PATH="${SPIKE_LOG_PATH:-$METRICS_LOG_DIR/spike_log.jsonl}"
LOG_FILE="${LOG_FILE:-$METRICS_LOG_DIR/train.log}"

# Layout of one 8-GPU node: 4 actor ranks (ZeRO-3) + 2 vLLM engines x TP 2 = 8 GPUs.
# The reference model (only when INIT_KL_COEF > 0) shares the actor's GPUs.
ACTOR_NUM_NODES="${ACTOR_NUM_NODES:-1}"
ACTOR_GPUS_PER_NODE="${ACTOR_GPUS_PER_NODE:-4}"
VLLM_NUM_ENGINES="${VLLM_NUM_ENGINES:-2}"
VLLM_TP="${VLLM_TP:-2}"
# 0.85 of 80 GB per rollout GPU: ~68 GB for MXFP4 weights + KV cache, headroom for NCCL.
VLLM_GPU_MEM_UTIL="${VLLM_GPU_MEM_UTIL:-0.85}"

# Rollout: a GRPO group is N_SAMPLES answers to one prompt.
N_SAMPLES="${N_SAMPLES:-8}"
MICRO_ROLLOUT_BATCH_SIZE="${MICRO_ROLLOUT_BATCH_SIZE:-8}"  # OpenRLHF 0.9.3's default, stated
PROMPT_MAX_LEN="${PROMPT_MAX_LEN:-1024}"   # NuminaMath prompts: p99.5 = 354 tokens
TEMPERATURE="${TEMPERATURE:-1.0}"
# The prompt spec: medium is the chat template's own default and the effort the base model is
# usually measured at; the date line is pinned so a run's prompts never change at midnight.
REASONING_EFFORT="${REASONING_EFFORT:-medium}"
PROMPT_DATE="${PROMPT_DATE:-2025-08-05}"
# The actor's faster gpt-oss layers (rft/fast_gptoss.py), parity tested against eager
# (tests/test_fast_gptoss.py) and timed on an H100 (bench/RESULTS.md): 1 = flex attention with
# sinks, grouped-GEMM experts, one-op RMS norms, one ZeRO-3 fetch per layer, and frozen weights
# kept whole where they fit (never under --offload); 0 is transformers' eager path; a list
# (attention,experts) picks parts.
RFT_FAST_GPTOSS="${RFT_FAST_GPTOSS:-1}"
# How the adapter reaches the engines: native serves it unmerged through vLLM's LoRA layers, the
# function the trainer computes; merged writes bf16(W0 + delta) into the weights, where an update
# under half a bf16 step of W0 is lost (most of a run at the 20b's LR; docs/weight_sync.md).
RFT_LORA_SYNC="${RFT_LORA_SYNC:-native}"

# Training. train_batch_size counts SAMPLES in OpenRLHF 0.9.3 (max_steps multiplies prompts by
# n_samples before dividing), so a rollout of R prompts x 8 samples gives R*8/TRAIN_BATCH_SIZE updates.
MICRO_TRAIN_BATCH_SIZE="${MICRO_TRAIN_BATCH_SIZE:-1}"
MAX_EPOCHS="${MAX_EPOCHS:-1}"
EPS_CLIP="${EPS_CLIP:-0.1}"                 # 0.2 -> 0.1 cut the gradient spikes of extreme ratios
ENTROPY_LOSS_COEF="${ENTROPY_LOSS_COEF:-0}" # 0: entropy is computed and logged, not optimized
SEED="${SEED:-42}"
# gpt-oss adds a learned attention sink to every head's softmax. transformers hands the sinks
# only to kernels that take them; FlashAttention-2 (OpenRLHF's default) silently drops them,
# so training would compute a different model than vLLM serves. eager keeps the sinks.
# (--packing_samples would force FlashAttention-2 back on: never combine it with gpt-oss.)
ATTN_IMPLEMENTATION="${ATTN_IMPLEMENTATION:-eager}"
LR_SCHEDULER="${LR_SCHEDULER:-cosine_with_min_lr}"

# Checkpoints: LoRA adapters as HF files every SAVE_STEPS rollouts; no DeepSpeed states (hundreds
# of GB with ZeRO-3, redundant with the adapter). OpenRLHF 0.9.3 applies MAX_CKPT_NUM to DeepSpeed
# checkpoints only, so every adapter folder is kept (about 0.1 GB each for the 20b).
SAVE_STEPS="${SAVE_STEPS:-10}"
MAX_CKPT_NUM="${MAX_CKPT_NUM:-3}"

# Pre-launch checks. Adapter checkpoints are ~0.1 GB each; the floors catch a nearly full disk.
MIN_FREE_GB_DATA="${MIN_FREE_GB_DATA:-50}"
MIN_FREE_GB_SCRATCH="${MIN_FREE_GB_SCRATCH:-20}"
MAX_GPU_MEM_USED_MIB="${MAX_GPU_MEM_USED_MIB:-2048}"  # more in use: another job holds the GPU
# Host memory: every actor process (and every reference-model process, INIT_KL_COEF > 0) that
# loads an MXFP4 checkpoint under ZeRO-3 holds the whole bf16 model in host memory while it
# loads, all at the same time (HOST_GIB_PER_LOAD is set per model; 0 turns the check off).
RFT_MEMINFO="${RFT_MEMINFO:-/proc/meminfo}"

RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_STOP_ON_EXIT="${RAY_STOP_ON_EXIT:-1}"

# ---- helpers ----------------------------------------------------------------------------
declare -A RUN=()  # the parsed command's values, set by rft_resolve
RFT_EXIT_FAILED=1
RFT_EXIT_REFUSED=2
RFT_EXIT_NOT_READY=3

# rft_die CODE MESSAGE: the one line of a refusal, then exit CODE.
rft_die() {
  local code="$1"
  shift
  echo "train_grpo_$MODEL_SIZE: $*" >&2
  exit "$code"
}

rft_ok() {
  echo "check: $*"
}

rft_abspath() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# The launcher's own options (--dry-run, --help); every other argument is OpenRLHF's, unread here:
# OpenRLHF's parser reads the whole command in rft_resolve.
rft_launcher_args() {
  DRY_RUN=0
  USER_ARGS=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) rft_usage; exit 0 ;;
      *) USER_ARGS+=("$arg") ;;
    esac
  done
}

# --help: the header comments of the launcher and of this file.
rft_usage() {
  local f
  for f in "$0" "$RFT_ROOT/grpo_common.sh"; do
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$f"
    echo
  done
}

# ---- the command ------------------------------------------------------------------------
rft_build_command() {
  local layout model lora optim rollout data evals ckpt
  layout=(
    --actor_num_nodes "$ACTOR_NUM_NODES" --actor_num_gpus_per_node "$ACTOR_GPUS_PER_NODE"
    --ref_num_nodes "$ACTOR_NUM_NODES" --ref_num_gpus_per_node "$ACTOR_GPUS_PER_NODE"
    --colocate_actor_ref
    --vllm_num_engines "$VLLM_NUM_ENGINES" --vllm_tensor_parallel_size "$VLLM_TP"
    --vllm_gpu_memory_utilization "$VLLM_GPU_MEM_UTIL"
    --vllm_sync_with_ray
  )
  model=(
    --pretrain "$MODEL_PATH"
    --attn_implementation "$ATTN_IMPLEMENTATION"
    --param_dtype bf16
    --zero_stage 3
    --gradient_checkpointing --gradient_checkpointing_use_reentrant
  )
  if [[ "$OFFLOAD" == 1 ]]; then
    model+=(--offload --adam_offload)
  fi
  lora=(
    --target_modules q_proj k_proj v_proj o_proj
    --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA"
  )
  optim=(
    --advantage_estimator dr_grpo
    --actor_learning_rate "$LR" --lr_scheduler "$LR_SCHEDULER" --lr_warmup_ratio "$WARMUP_RATIO"
    --init_kl_coef "$INIT_KL_COEF"
    --eps_clip "$EPS_CLIP"
    --entropy_loss_coef "$ENTROPY_LOSS_COEF"
    --train_batch_size "$TRAIN_BATCH_SIZE" --micro_train_batch_size "$MICRO_TRAIN_BATCH_SIZE"
    --max_epochs "$MAX_EPOCHS" --num_episodes "$NUM_EPISODES"
    --seed "$SEED"
  )
  rollout=(
    --n_samples_per_prompt "$N_SAMPLES"
    --rollout_batch_size "$ROLLOUT_BATCH_SIZE" --micro_rollout_batch_size "$MICRO_ROLLOUT_BATCH_SIZE"
    --prompt_max_len "$PROMPT_MAX_LEN" --generate_max_len "$GENERATE_MAX_LEN"
    --temperature "$TEMPERATURE"
  )
  data=(
    --prompt_data "$PROMPT_DATA" --max_samples "$MAX_SAMPLES"
    --input_key input --label_key label --apply_chat_template
    --reasoning_effort "$REASONING_EFFORT" --prompt_date "$PROMPT_DATE"
    --remote_rm_url "$REWARD_FUNC"
  )
  evals=()
  if [[ -n "$EVAL_DATASET" ]]; then
    evals=(
      --eval_dataset "$EVAL_DATASET" --eval_steps "$EVAL_STEPS"
      --eval_temperature "$EVAL_TEMPERATURE" --eval_n_samples_per_prompt "$EVAL_N_SAMPLES"
    )
  fi
  ckpt=(
    --save_path "$SAVE_PATH" --ckpt_path "$CKPT_PATH"
    --save_steps "$SAVE_STEPS" --save_hf_ckpt --disable_ds_ckpt --max_ckpt_num "$MAX_CKPT_NUM"
    --logging_steps 1
  )
  TRAIN_CMD=(
    "$PYTHON_BIN" -m openrlhf.cli.train_ppo_ray
    "${layout[@]}" "${model[@]}" "${lora[@]}" "${optim[@]}" "${rollout[@]}"
    "${data[@]}" "${evals[@]}" "${ckpt[@]}"
    "${USER_ARGS[@]}"
  )
}

# The command one flag a line, each value shell-quoted so the text can be pasted back.
rft_print_command() {
  local shown line arg
  mapfile -t shown < <(rft_tool redact "${TRAIN_CMD[@]}")
  line="$(printf '%q' "${shown[0]}") ${shown[1]} ${shown[2]}"
  for arg in "${shown[@]:3}"; do
    if [[ "$arg" == --* ]]; then
      printf '%s \\\n' "$line"
      line="  $arg"
    else
      line+=" $(printf '%q' "$arg")"
    fi
  done
  printf '%s\n' "$line"
}

# ---- checks, in launch order; none creates anything --------------------------------------
rft_tool() {
  PYTHONPATH="$RFT_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON_BIN" -m rft.launch_tools "$@"
}

rft_check_python() {
  if ! PYTHON_BIN="$(command -v "$PYTHON")"; then
    rft_die "$RFT_EXIT_NOT_READY" "python: $PYTHON not found; set PYTHON to the interpreter that has openrlhf installed"
  fi
  PYTHON_BIN="$(rft_abspath "$PYTHON_BIN")"
  if [[ -z "$RAY_BIN" ]]; then
    RAY_BIN="$(dirname "$PYTHON_BIN")/ray"
    [[ -x "$RAY_BIN" ]] || RAY_BIN=ray
  fi
  if ! "$PYTHON_BIN" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("openrlhf") is None)' 2>/dev/null; then
    rft_die "$RFT_EXIT_NOT_READY" "python: $PYTHON_BIN cannot import openrlhf; activate the training environment or set PYTHON"
  fi
}

# Every setting, then the whole command as OpenRLHF's own (patched) parser and validation read it,
# then what rft knows cannot work (rft/launch_tools.py resolve). Sets TRAIN_CMD (paths made
# absolute) and RUN, the parsed values the later checks read: no flag is re-parsed in shell.
rft_resolve() {
  local names=() name settings=() out rc=0
  mapfile -t names < <(rft_tool setting-names)
  for name in "${names[@]}"; do
    settings+=(--setting "$name=${!name-}")
  done
  rft_build_command
  out="$(rft_tool resolve --cwd "$PWD" "${settings[@]}" \
    --path "METRICS_LOG_DIR=$METRICS_LOG_DIR" --path "SAMPLES_LOG_DIR=$SAMPLES_LOG_DIR" \
    --path "SPIKE_LOG_PATH=$SPIKE_LOG_PATH" --path "LOG_FILE=$LOG_FILE" \
    --root "DATA_ROOT=$DATA_ROOT" --root "SCRATCH_ROOT=$SCRATCH_ROOT" -- "${TRAIN_CMD[@]}")" || rc=$?
  if ((rc == RFT_EXIT_REFUSED || rc == RFT_EXIT_NOT_READY)); then
    rft_die "$rc" "$out"
  elif ((rc != 0)); then
    rft_die "$RFT_EXIT_NOT_READY" "could not check the command (the traceback above); run: $PYTHON_BIN -m rft.launch_tools --help"
  fi
  eval "$out"
}

rft_check_patches() {
  if [[ ! -f "$APPLY_PATCHES" ]]; then
    rft_die "$RFT_EXIT_NOT_READY" "patches: $APPLY_PATCHES not found; the OpenRLHF patches cannot be verified (set APPLY_PATCHES or restore it from git)"
  fi
  PATCH_RC=0
  PATCH_STATUS="$(PYTHON="$PYTHON_BIN" bash "$APPLY_PATCHES" --status 2>&1)" || PATCH_RC=$?
  if ((PATCH_RC == 6)); then
    printf '%s\n' "$PATCH_STATUS"
    rft_die "$RFT_EXIT_NOT_READY" "rft: import rft in $PYTHON_BIN does not resolve to $RFT_ROOT, so the patched OpenRLHF would run another copy's hooks; run: $PYTHON_BIN -m pip install -e $RFT_ROOT (or bash setup_node.sh)"
  elif ((PATCH_RC != 0)); then
    printf '%s\n' "$PATCH_STATUS"
    rft_die "$RFT_EXIT_NOT_READY" "patches: not every patch of patches/series is applied to the installed OpenRLHF; run: bash apply_patches.sh"
  fi
  rft_ok "patches applied ($APPLY_PATCHES --status)"
}

# Every row of the pool and of the eval set (rft/launch_tools.py check_data).
rft_check_data() {
  local f rows max="${RUN[max_samples]}"
  for f in "${RUN[prompt_data]}" ${RUN[eval_dataset]:+"${RUN[eval_dataset]}"}; do
    if ! rows="$(rft_tool check-data "$f" --keys input,label 2>&1)"; then
      rft_die "$RFT_EXIT_REFUSED" "data: ${rows##*$'\n'}"
    fi
    rft_ok "data $f: $rows rows"
    if [[ "$f" == "${RUN[prompt_data]}" ]]; then
      POOL_ROWS="$rows"
    elif ((rows > max)); then
      rft_die "$RFT_EXIT_REFUSED" "data: $f has $rows rows but --max_samples ${RUN[max_samples]} also cuts the eval set to its first ${RUN[max_samples]} in OpenRLHF 0.9.3; raise MAX_SAMPLES or shorten the eval set"
    fi
  done
}

# The pre-flight's inputs, from the parsed command.
rft_preflight() {
  env POOL="$POOL_ROWS" NS="${RUN[n_samples_per_prompt]}" TBS="${RUN[train_batch_size]}" \
    EP="${RUN[num_episodes]}" WARMUP="${RUN[lr_warmup_ratio]}" LR="${RUN[actor_learning_rate]}" \
    RBS="${RUN[rollout_batch_size]}" MAX_EPOCHS="${RUN[max_epochs]}" MAX_SAMPLES="${RUN[max_samples]}" \
    PYTHON="$PYTHON_BIN" bash "$RFT_ROOT/preflight_lr.sh" "$@"
}

rft_check_preflight() {
  if ! rft_preflight; then
    rft_die "$RFT_EXIT_REFUSED" "pre-flight: the LR schedule above must not be launched (see ABORT); fix the settings and retry"
  fi
  rft_ok "pre-flight LR schedule"
}

# Free space of the file system that holds $1 (its nearest existing ancestor), in GiB.
rft_free_gb() {
  local dir="$1" probe
  while [[ ! -e "$dir" && "$dir" != / ]]; do dir="$(dirname "$dir")"; done
  # Write a file there: the only test that also holds for root and for read-only mounts.
  if [[ ! -d "$dir" ]] || ! probe="$(mktemp -p "$dir" .rft-write-test.XXXXXX 2>/dev/null)"; then
    echo "unwritable:$dir"
    return
  fi
  rm -f "$probe"
  df -Pk "$dir" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'
}

rft_check_disk() {
  local spec path need free
  for spec in "${RUN[ckpt_path]}:$MIN_FREE_GB_DATA" "${RUN[save_path]}:$MIN_FREE_GB_DATA" \
    "$METRICS_LOG_DIR:$MIN_FREE_GB_SCRATCH" "$SAMPLES_LOG_DIR:$MIN_FREE_GB_SCRATCH"; do
    path="${spec%:*}"
    need="${spec##*:}"
    free="$(rft_free_gb "$path")"
    if [[ "$free" == unwritable:* ]]; then
      rft_die "$RFT_EXIT_NOT_READY" "disk: cannot write under ${free#unwritable:} (for $path); set DATA_ROOT / SCRATCH_ROOT to writable disks"
    fi
    if ((free < need)); then
      rft_die "$RFT_EXIT_NOT_READY" "disk: $free GiB free for $path, need $need GiB; free space or point DATA_ROOT / SCRATCH_ROOT elsewhere"
    fi
    rft_ok "disk $path: $free GiB free (need $need)"
  done
}

# GiB that the actor (and reference) processes of this node hold at once while they load.
rft_host_gib_needed() {
  local loads="${RUN[actor_num_gpus_per_node]}"
  if awk -v k="${RUN[init_kl_coef]}" 'BEGIN { exit !(k + 0 > 0) }'; then
    loads=$((loads * 2))
  fi
  echo "$((loads * HOST_GIB_PER_LOAD)) $loads"
}

# MemAvailable of this machine in GiB (empty when it cannot be read).
rft_host_gib_available() {
  awk '$1 == "MemAvailable:" { printf "%d", $2 / 1048576; found = 1 } END { exit !found }' \
    "$RFT_MEMINFO" 2>/dev/null || true
}

# A dry run only reports a shortfall (it is often run on a smaller login machine); a launch refuses.
rft_check_host_memory() {
  local need loads avail
  if ((HOST_GIB_PER_LOAD == 0)); then
    rft_ok "host memory: not checked (HOST_GIB_PER_LOAD=0)"
    return
  fi
  read -r need loads <<<"$(rft_host_gib_needed)"
  avail="$(rft_host_gib_available)"
  if [[ -z "$avail" ]]; then
    rft_ok "host memory: $RFT_MEMINFO unreadable, not checked (the load needs about $need GiB)"
    return
  fi
  local line="$avail GiB available, $loads processes loading at once need about $need GiB ($HOST_GIB_PER_LOAD each)"
  if ((avail >= need)); then
    rft_ok "host memory: $line"
  elif ((DRY_RUN)); then
    echo "warning: host memory: $line; a launch here would be refused"
  else
    rft_die "$RFT_EXIT_NOT_READY" "host memory: $line; free memory, set INIT_KL_COEF=0 (no reference model), or lower HOST_GIB_PER_LOAD if the model is smaller"
  fi
}

# GPUs the layout takes: actor ranks (the reference model shares them) + vLLM engines x TP.
rft_gpus_needed() {
  local nodes="${RUN[actor_num_nodes]}" per_node="${RUN[actor_num_gpus_per_node]}"
  local engines="${RUN[vllm_num_engines]}" tp="${RUN[vllm_tensor_parallel_size]}"
  echo "$((nodes * per_node + engines * tp))"
}

rft_check_gpus() {
  local need out n idx used
  need="$(rft_gpus_needed)"
  if [[ "${RFT_CPU_STAND_INS:-0}" == 1 ]]; then
    rft_ok "GPUs: none used (CPU run, rft/cpu_stand_ins.py); Ray gets $need logical GPUs"
    return
  fi
  if [[ -n "${RAY_ADDRESS:-}" ]]; then
    rft_ok "GPUs: counted by the Ray cluster at $RAY_ADDRESS ($need needed)"
    return
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    rft_die "$RFT_EXIT_NOT_READY" "GPUs: nvidia-smi not found; this machine has no NVIDIA driver ($need GPUs needed)"
  fi
  if ! out="$(nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits 2>&1)"; then
    rft_die "$RFT_EXIT_NOT_READY" "GPUs: nvidia-smi failed: ${out##*$'\n'}"
  fi
  n=0
  while IFS=', ' read -r idx used; do
    [[ -z "$idx" ]] && continue
    n=$((n + 1))
    if ((used > MAX_GPU_MEM_USED_MIB)); then
      rft_die "$RFT_EXIT_NOT_READY" "GPUs: GPU $idx already has $used MiB in use (another job?); see nvidia-smi, or raise MAX_GPU_MEM_USED_MIB"
    fi
  done <<<"$out"
  if ((n < need)); then
    rft_die "$RFT_EXIT_NOT_READY" "GPUs: $n visible, the layout needs $need (actor ${RUN[actor_num_nodes]} x ${RUN[actor_num_gpus_per_node]} + vLLM ${RUN[vllm_num_engines]} x ${RUN[vllm_tensor_parallel_size]})"
  fi
  rft_ok "GPUs: $n visible, $need needed"
}

# ---- after the checks: the run's folders, its log, Ray ----------------------------------
# Until the checks pass, the output goes to the terminal and to a temp file only; here the
# run's folders are created, the temp file starts the run's log, and the log follows the rest.
rft_capture_early_output() {
  RFT_EARLY_LOG="$(mktemp "${TMPDIR:-/tmp}/rft-launch.XXXXXX")"
  exec 3>&1 4>&2
  exec > >(tee -a "$RFT_EARLY_LOG")
  RFT_TEE_PIDS=("$!")
  exec 2> >(tee -a "$RFT_EARLY_LOG" >&2)
  RFT_TEE_PIDS+=("$!")
}

rft_open_log() {
  # The metrics patches read these variables inside the Ray actors.
  export METRICS_LOG_DIR SAMPLES_LOG_DIR SPIKE_LOG_PATH
  export PYTHONUNBUFFERED=1
  if ! mkdir -p "$METRICS_LOG_DIR" "$SAMPLES_LOG_DIR" "$(dirname "$SPIKE_LOG_PATH")" "$(dirname "$LOG_FILE")" 2>/dev/null; then
    rft_die "$RFT_EXIT_NOT_READY" "metrics: cannot create $METRICS_LOG_DIR or $SAMPLES_LOG_DIR; set SCRATCH_ROOT to a writable disk"
  fi
  exec 1>&3 2>&4
  wait "${RFT_TEE_PIDS[@]}" 2>/dev/null || true
  cat "$RFT_EARLY_LOG" >>"$LOG_FILE"
  rm -f "$RFT_EARLY_LOG"
  exec > >(tee -a "$LOG_FILE")
  RFT_TEE_PIDS=("$!")
  exec 2> >(tee -a "$LOG_FILE" >&2)
  RFT_TEE_PIDS+=("$!")
  echo "log: $LOG_FILE"
}

rft_check_ray() {
  if [[ -z "${RAY_ADDRESS:-}" ]]; then
    local need out
    need="$(rft_gpus_needed)"
    # Started after the exports above, so every Ray worker inherits them.
    if ! out="$("$RAY_BIN" start --head --num-gpus "$need" ${RAY_NUM_CPUS:+--num-cpus "$RAY_NUM_CPUS"} --dashboard-host 127.0.0.1 \
      --dashboard-port "$RAY_DASHBOARD_PORT" --disable-usage-stats 2>&1)"; then
      printf '%s\n' "$out"
      rft_die "$RFT_EXIT_NOT_READY" "Ray: could not start a local head (already running? then set RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT)"
    fi
    RAY_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT"
    RFT_RAY_STARTED=1
  fi
  if ! timeout 60 "$RAY_BIN" job list --address "$RAY_ADDRESS" >/dev/null 2>&1; then
    rft_die "$RFT_EXIT_NOT_READY" "Ray: no job server at $RAY_ADDRESS; RAY_ADDRESS must be the dashboard address (http://head:8265)"
  fi
  rft_ok "Ray reachable at $RAY_ADDRESS"
}

# On exit: stop the Ray head this launcher started, then let the log tees drain, so that the
# last line (often the reason for a refusal) is on the terminal before the prompt returns.
rft_on_exit() {
  local rc=$?
  rm -f "${PREFLIGHT_JSON:-}" "${RFT_EARLY_LOG:-}"
  if [[ "${RFT_RAY_STARTED:-0}" == 1 && "$RAY_STOP_ON_EXIT" == 1 ]]; then
    "$RAY_BIN" stop >/dev/null 2>&1 || true
  fi
  exec >&- 2>&-
  wait "${RFT_TEE_PIDS[@]}" 2>/dev/null || true
  exit "$rc"
}

# The manifest records the command; the arguments OpenRLHF parses from it (openrlhf_args) and
# the run-log paths are read from it and from the runtime env by rft/launch_tools.py. The
# settings below are the launcher's own, which no OpenRLHF flag carries.
rft_write_manifest() {
  local settings=() name submit flags=()
  for name in MODEL_SIZE RUN_NAME DATA_ROOT SCRATCH_ROOT HOST_GIB_PER_LOAD MIN_FREE_GB_DATA \
    MIN_FREE_GB_SCRATCH MAX_GPU_MEM_USED_MIB; do
    settings+=(--setting "$name=${!name}")
  done
  PREFLIGHT_JSON="$(mktemp "${TMPDIR:-/tmp}/rft-preflight.XXXXXX")"
  rft_preflight --json --plot "$METRICS_LOG_DIR/lr_schedule.png" >"$PREFLIGHT_JSON" 2>/dev/null || true
  submit="$(IFS=$'\x1f'; printf '%s' "${SUBMIT_CMD[*]}")"
  if ((DRY_RUN)); then flags+=(--dry-run); fi
  rft_tool manifest --out "$METRICS_LOG_DIR/run_manifest.json" --run-name "$RUN_NAME" \
    --repo "$RFT_ROOT" "${flags[@]}" --submit "$submit" --log-file "$LOG_FILE" \
    --patch-rc "$PATCH_RC" --patch-status="$PATCH_STATUS" --preflight-json "$PREFLIGHT_JSON" \
    "${settings[@]}" --env METRICS_LOG_DIR --env SAMPLES_LOG_DIR --env SPIKE_LOG_PATH \
    --env RAY_ADDRESS --env PYTHONUNBUFFERED --env HF_HOME --env RFT_LORA_SYNC -- "${TRAIN_CMD[@]}" ||
    rft_die "$RFT_EXIT_NOT_READY" "manifest: could not write $METRICS_LOG_DIR/run_manifest.json"
  echo "manifest: $METRICS_LOG_DIR/run_manifest.json"
}

# ---- main -------------------------------------------------------------------------------
grpo_main() {
  rft_launcher_args "$@"
  trap rft_on_exit EXIT
  rft_capture_early_output
  echo "== train_grpo_$MODEL_SIZE $(date -u +%Y-%m-%dT%H:%M:%SZ) run $RUN_NAME$( ((DRY_RUN)) && echo ' (dry run)')"
  PROMPT_DATA="$(rft_abspath "$PROMPT_DATA")"
  REWARD_FUNC="$(rft_abspath "$REWARD_FUNC")"
  if [[ -n "$EVAL_DATASET" ]]; then EVAL_DATASET="$(rft_abspath "$EVAL_DATASET")"; fi

  rft_check_python
  rft_check_patches  # first: only the patched parser knows the flags the patches add
  rft_resolve
  if [[ "$RFT_LORA_SYNC" == native ]]; then
    echo "weight sync: native LoRA (vLLM serves the adapter unmerged; RFT_LORA_SYNC=merged for bf16(W0 + delta))"
  else
    echo "weight sync: merged (bf16(W0 + delta) in the engines' weights; RFT_LORA_SYNC=native serves the adapter)"
  fi
  rft_check_data
  rft_check_preflight
  rft_check_disk
  rft_check_host_memory
  if ((DRY_RUN)); then
    echo "check: GPUs and Ray skipped (dry run)"
  else
    rft_check_gpus
  fi

  rft_open_log
  if ((!DRY_RUN)); then
    rft_check_ray
  fi
  local runtime_env
  # The run-log paths always; the patches' optional knobs and the HF cache settings when set.
  export RFT_FAST_GPTOSS RFT_LORA_SYNC
  runtime_env="$(rft_tool runtime-env METRICS_LOG_DIR SAMPLES_LOG_DIR SPIKE_LOG_PATH PYTHONUNBUFFERED RFT_FAST_GPTOSS \
    --optional SPIKE_GRAD_NORM SAMPLES_LOG_COUNT RFT_LORA_SYNC RFT_LORA_PRISTINE RFT_LORA_SCRATCH_MB RFT_FAST_GPTOSS_RESIDENT_GIB \
    HF_HOME HF_HUB_OFFLINE \
    PYTHONPATH RFT_CPU_STAND_INS VLLM_CPU_KVCACHE_SPACE VLLM_CPU_OMP_THREADS_BIND OMP_NUM_THREADS \
    TORCHDYNAMO_DISABLE)"
  SUBMISSION_ID="$RUN_NAME-$(date -u +%Y%m%d-%H%M%S)"
  SUBMIT_CMD=("$RAY_BIN" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:$RAY_DASHBOARD_PORT}"
    --submission-id "$SUBMISSION_ID" --runtime-env-json "$runtime_env" --)
  rft_write_manifest
  echo "command:"
  rft_print_command
  if ((DRY_RUN)); then
    echo "dry run: every check that needs no GPU passed; nothing launched"
    return 0
  fi
  rft_submit
}

# Submits without waiting, retrying while a fresh head's job agent is not up yet ("No available
# agent to submit job"), then follows the job's log; exits non-zero unless the job SUCCEEDED.
rft_submit() {
  local out tries=0 status
  until out="$("${SUBMIT_CMD[@]:0:3}" --no-wait "${SUBMIT_CMD[@]:3}" "${TRAIN_CMD[@]}" 2>&1)"; do
    tries=$((tries + 1))
    if [[ "$out" != *"No available agent"* ]] || ((tries >= 60)); then
      printf '%s\n' "$out"
      rft_die "$RFT_EXIT_FAILED" "Ray: could not submit the job to $RAY_ADDRESS (see above)"
    fi
    sleep 2
  done
  echo "job $SUBMISSION_ID submitted; following its log (Ctrl-C stops following, not the job)"
  "$RAY_BIN" job logs --address "$RAY_ADDRESS" --follow "$SUBMISSION_ID" || true
  out="$("$RAY_BIN" job status --address "$RAY_ADDRESS" "$SUBMISSION_ID" 2>&1)" || true
  status=""
  # Ray 2.48 prints "Job '<id>' succeeded" (or failed, was stopped) once the job has ended, and
  # "Status for job '<id>': RUNNING" before; colour codes may wrap the words.
  if [[ "$out" =~ Job\ [^\ ]*\'"$SUBMISSION_ID"\'[^\ ]*\ ([a-z ]+) ]]; then
    status="${BASH_REMATCH[1]^^}"
    status="${status// /_}"
  elif [[ "$out" =~ Status\ for\ job\ \'[^\']*\':\ [^A-Z]*([A-Z]+) ]]; then
    status="${BASH_REMATCH[1]}"
  fi
  if [[ "$status" != SUCCEEDED ]]; then
    rft_die "$RFT_EXIT_FAILED" "job $SUBMISSION_ID: ${status:-status unknown}; see $LOG_FILE and ray job logs $SUBMISSION_ID"
  fi
  echo "job $SUBMISSION_ID succeeded"
}
