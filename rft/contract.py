"""The names rft's pieces share, defined once.

The hooks that the patches call (``rft.openrlhf``), the launcher's tools, ``check_run.py``
and the eval import what they exchange from here: the run's file names, the environment
variables the launcher hands to the trainer, and the reward's log keys.
``tests/test_contract.py`` ties every consumer to this module.

The reward function defines its own keys: it stays standard-library only, because
OpenRLHF loads it from its file path (``--remote_rm_url``). They are re-exported here.
"""

from __future__ import annotations

from reward_func_em import EXTRA_LOG_KEYS, PARSE_METHOD_CODES, TEXT_LOG_KEYS

# ----------------------------------------------------------------------------- run files
METRICS_FILE = "training_metrics.jsonl"
"""One JSON object per global step, in $METRICS_LOG_DIR."""
SUPERSEDED_FILE = "training_metrics.superseded.jsonl"
"""Step records a resumed run replaced, moved aside rather than deleted."""
LEARNING_LOG = "learning.log"
"""One human-readable line per step, for ``tail -f``."""
SPIKE_FILE = "spike_log.jsonl"
"""Default name of the spike log ($SPIKE_LOG_PATH overrides the whole path)."""
RUN_MANIFEST = "run_manifest.json"
"""The settings a run really used, written by the launcher beside the metrics."""
MANIFEST_ARGS = "openrlhf_args"
"""Manifest key: the arguments as OpenRLHF's (patched) parser and validation hand them to train()."""
MANIFEST_RUN_LOGS = "run_logs"
"""Manifest key: where the run's logs go, keyed by the ENV_* names below."""
MANIFEST_PROMPT_SPEC = "prompt_spec"
"""Manifest key: rft/prompt_spec.py's specification of the run's prompts, with its digest."""


def samples_file(step: int) -> str:
    """Name of the sample outputs written on checkpoint step ``step``."""
    return f"samples_step{step}.jsonl"


SAMPLES_GLOB = "samples_step*.jsonl"

# ------------------------------------------------------------------ environment variables
ENV_METRICS_DIR = "METRICS_LOG_DIR"
ENV_SAMPLES_DIR = "SAMPLES_LOG_DIR"
ENV_SPIKE_PATH = "SPIKE_LOG_PATH"
ENV_SPIKE_GRAD_NORM = "SPIKE_GRAD_NORM"
ENV_SAMPLES_COUNT = "SAMPLES_LOG_COUNT"
RUN_LOG_ENV_VARS = (ENV_METRICS_DIR, ENV_SAMPLES_DIR, ENV_SPIKE_PATH, ENV_SPIKE_GRAD_NORM, ENV_SAMPLES_COUNT)
"""What the launcher hands to the trainer's actors for the run logs."""
DEFAULT_SPIKE_GRAD_NORM = 50.0
DEFAULT_SAMPLES_LOG_COUNT = 16
ENV_FAST_GPTOSS = "RFT_FAST_GPTOSS"
"""Set in the actor's process (not 0): the Actor installs rft.fast_gptoss's faster gpt-oss layers."""
ENV_FAST_GPTOSS_RESIDENT_GIB = "RFT_FAST_GPTOSS_RESIDENT_GIB"
"""GiB of frozen weights the fast path may keep whole on each GPU (default: half the GPU)."""
ENV_LORA_PRISTINE = "RFT_LORA_PRISTINE"
"""Read by every vLLM worker at its first LoRA sync: where it keeps the base shards, ``cpu``
(pinned host memory, the default) or ``gpu``."""
ENV_LORA_SCRATCH_MB = "RFT_LORA_SCRATCH_MB"
"""Read by every vLLM worker at each LoRA sync: MiB of device memory its merge may use at once."""
ENV_LORA_SYNC = "RFT_LORA_SYNC"
"""Read once in the driver when the engines are created: one of ``LORA_SYNC_MODES``;
rft/openrlhf/native_lora.py."""
LORA_SYNC_MODES = ("native", "merged")
"""``native`` (the default: vLLM serves the adapter unmerged, as the trainer computes it) or
``merged`` (bf16(W0 + delta) in the engine's weights)."""
LORA_SYNC_ENV_VARS = (ENV_LORA_PRISTINE, ENV_LORA_SCRATCH_MB, ENV_LORA_SYNC)
"""What the launcher hands to the vLLM engines' processes for the LoRA sync."""

# ------------------------------------------------------------------------ reward log keys
SHARE_KEYS = ("correctness", "has_answer", "has_boxed", "boxed_in_final", "truncated_response")
"""Reward logs that are 0/1 per sample: logged per step as shares of the rollout batch."""
PARSE_METHOD_NAMES = {code: name for name, code in PARSE_METHOD_CODES.items()}

