"""The one definition of every key in ``training_metrics.jsonl``: unit, source and meaning.

The patched OpenRLHF code (metrics_experience / metrics_actor / metrics_trainer patches)
writes these keys; ``check_run.py`` reads them; ``docs/metrics.md`` is rendered from here
(``python -m rft.metrics_schema --markdown``) and a test keeps both in step.

Sources: ``experience`` = computed by the trainer over the whole rollout batch;
``actor`` = the policy ranks, combined exactly across ranks once per global step;
``actor-mean`` = OpenRLHF's own status value, mean over micro-steps and ranks;
``trainer`` = the single controller; ``sync`` = ``broadcast_to_vllm`` of the first policy
rank; ``eval`` = held-out evaluation (eval steps only); ``derived`` = computed by
``check_run.py`` from other keys of the same record when the trainer did not write it.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One key of a step record."""

    key: str
    unit: str
    source: str
    meaning: str


def _m(key: str, unit: str, source: str, meaning: str) -> Metric:
    return Metric(key, unit, source, meaning)


METRICS: tuple[Metric, ...] = (
    # trainer
    _m("run_id", "id", "trainer", "Random id of the process that wrote the line; changes on every (re)start."),
    _m("global_step", "rollouts", "trainer", "Rollout batches trained so far (OpenRLHF global_step; first logged value 1)."),
    _m("episode", "count", "trainer", "Zero-based episode (pass over the prompt set) of this step."),
    _m("timestamp", "s (unix)", "trainer", "Wall-clock time the line was written."),
    _m("generation_seconds", "s", "trainer", "vLLM generation of the rollout batch, rewards included (sync trainer)."),
    _m("experience_seconds", "s", "trainer", "Experience making: log-probs, rewards, advantages."),
    _m("training_seconds", "s", "trainer", "PPO update of actor (and critic) on the rollout."),
    _m("weight_sync_seconds", "s", "trainer", "Wall time of the trainer's weight-sync phase (vLLM wake-up included)."),
    _m("checkpoint_seconds", "s", "trainer", "Checkpoint save of this step (about 0 on steps without a save)."),
    _m("nonfinite_keys", "list", "trainer", "Keys whose value was NaN or infinite; written as null."),
    _m(
        "metrics_records_lost",
        "records",
        "trainer",
        "Step records lost before this one because the file could not be written (a full disk); only after a loss.",
    ),
    _m(
        "dynamic_filtering_pass_rate",
        "%",
        "trainer",
        "With --dynamic_filtering: rollout_batch_size / prompts consumed * 100.",
    ),
    # experience
    _m("rollout_samples", "samples", "experience", "Samples in the rollout batch."),
    _m("rollout_prompts", "prompts", "experience", "Prompts in the rollout batch (samples / n_samples_per_prompt)."),
    _m("reward_mean", "reward", "experience", "Mean reward of the reward function, before length penalties."),
    _m("reward_std", "reward", "experience", "Population standard deviation of the rewards in the batch."),
    _m("reward_min", "reward", "experience", "Smallest reward in the batch."),
    _m("reward_max", "reward", "experience", "Largest reward in the batch."),
    _m("reward_p90", "reward", "experience", "90th percentile of the rewards (linear interpolation)."),
    _m("correctness", "share", "experience", "Share of samples whose extracted answer matches the label."),
    _m("has_answer", "share", "experience", "Share of samples from which an answer was extracted."),
    _m("has_boxed", "share", "experience", "Share of samples with a \\boxed{} answer."),
    _m("boxed_in_final", "share", "experience", "Share of samples whose last \\boxed{} is in the final part of the response."),
    _m("truncated_response", "share", "experience", "Share of samples the reward judged cut off (heuristic)."),
    _m("has_final_channel", "share", "experience", "Share of samples with a Harmony final-channel message (the only text scored)."),
    _m("reward_error", "share", "experience", "Share of samples the reward could not score properly (bad input, empty label, internal error)."),
    _m("parse_method_boxed", "share", "experience", "Share of samples whose answer came from \\boxed{}."),
    _m("parse_method_last_number", "share", "experience", "Share of samples whose answer fell back to the last number."),
    _m("parse_method_none", "share", "experience", "Share of samples with no extractable answer."),
    _m(
        "high_reward_but_wrong",
        "share",
        "experience",
        "Share of samples with reward > 0.5 and correctness 0 (always 0 with an exact-match reward).",
    ),
    _m("reward_failures", "share", "experience", "Share of samples whose reward function failed (fallback reward used)."),
    _m("reward_failures_count", "samples", "experience", "Number of samples whose reward function failed."),
    _m("response_length", "tokens", "experience", "Mean response length of the batch."),
    _m("response_length_max", "tokens", "experience", "Longest response of the batch."),
    _m("truncated", "share", "experience", "Share of samples that hit the generation limit (finish_reason length)."),
    _m(
        "frac_reward_zero_std",
        "share",
        "experience",
        "Share of prompts whose samples all got the same reward: zero advantage, no learning signal.",
    ),
    _m("pass_at_1", "share", "experience", "Mean over prompts of the share of correct samples (batch pass@1)."),
    _m("pass_at_all", "share", "experience", "Share of prompts with at least one correct sample (batch pass@n)."),
    _m(
        "gen_kl",
        "nats",
        "experience",
        "Generation KL: k3 estimate of the KL from the engine's policy to the trainer's on the engine's sampled tokens (vLLM's log-probs "
        "against the policy's old log-probs), token mean over the step. Warn > 0.002, stop advice > 0.02 sustained.",
    ),
    _m("gen_kl_seq_max", "nats", "experience", "Largest per-sequence token mean of the generation KL in the step."),
    _m(
        "gen_kl_seq_p99",
        "nats",
        "experience",
        "99th percentile (linear interpolation) of the per-sequence generation KL over the step's sequences.",
    ),
    # actor, exact per step
    _m("advantage_mean", "advantage", "actor", "Mean advantage over all action tokens of the step."),
    _m("advantage_std", "advantage", "actor", "Standard deviation of the advantage over all action tokens."),
    _m("advantage_max", "advantage", "actor", "Largest token advantage."),
    _m("advantage_min", "advantage", "actor", "Smallest token advantage."),
    _m("entropy_mean", "nats", "actor", "Mean token entropy over action tokens (needs --entropy_loss_coef 0)."),
    _m("entropy_p10", "nats", "actor", "10th percentile of token entropy over action tokens of all ranks."),
    _m("entropy_p90", "nats", "actor", "90th percentile of token entropy over action tokens of all ranks."),
    _m("log_ratio_raw_max", "log-ratio", "actor", "Largest log(pi/pi_old) before the [-20, 20] clamp; max over micro-batches and ranks."),
    _m("log_ratio_max", "log-ratio", "actor", "Largest clamped log-ratio; max over micro-batches and ranks."),
    _m("log_ratio_min", "log-ratio", "actor", "Smallest clamped log-ratio; min over micro-batches and ranks."),
    _m("ratio_max", "ratio", "actor", "Largest importance ratio exp(log_ratio); max over micro-batches and ranks."),
    _m(
        "log_ratio_abs_p99",
        "log-ratio",
        "actor",
        "Largest per-micro-batch 99th percentile of |log-ratio|: an upper bound of the step's p99.",
    ),
    _m("trained_tokens", "tokens", "actor", "Action tokens in the loss over all micro-batches, epochs and ranks."),
    _m("optimizer_steps", "steps", "actor", "Optimizer steps taken during this global step."),
    _m("grad_norm", "L2 norm", "actor", "DeepSpeed global grad norm before clipping, mean over this step's optimizer steps."),
    _m("grad_norm_max", "L2 norm", "actor", "Largest pre-clipping grad norm of this step's optimizer steps."),
    _m("lr", "lr", "actor", "Actor learning rate after the step's last optimizer step."),
    _m("metric_errors", "count", "actor", "Micro-batches whose statistics could not be computed (0 when healthy)."),
    # actor, OpenRLHF's own means
    _m("policy_loss", "loss", "actor-mean", "PPO clipped policy loss (token mean per micro-batch)."),
    _m("actor_lr", "lr", "actor-mean", "Learning rate, mean over micro-steps (OpenRLHF's key)."),
    _m("entropy_loss", "nats", "actor-mean", "Token entropy, mean of per-micro-batch means (OpenRLHF's key)."),
    _m("ppo_clip_ratio", "share", "actor-mean", "Share of tokens whose ratio was clipped."),
    _m("ppo_kl", "nats", "actor-mean", "Approximate KL between the policy before and during the update."),
    _m("vllm_kl", "nats", "actor-mean", "With --enable_vllm_is_correction: KL between vLLM and policy log-probs."),
    _m("kl", "nats", "actor-mean", "KL to the reference model, length-weighted (0 without a reference model)."),
    _m("logprobs_diff", "nats", "actor-mean", "Mean log-prob difference to the reference model, length-weighted."),
    _m("reward", "reward", "actor-mean", "Reward, mean over trained samples (see reward_mean for the exact batch value)."),
    _m("score", "reward", "actor-mean", "Reward function's score (0-1) used by dynamic filtering."),
    _m("return", "reward", "actor-mean", "Sum of the shaped per-token rewards of a sample."),
    _m("total_length", "tokens", "actor-mean", "Prompt plus response length."),
    _m("response_clip_ratio", "share", "actor-mean", "Share of samples that reached prompt_max_len + generate_max_len."),
    _m("group_reward_std", "reward", "actor-mean", "Standard deviation of the rewards within a prompt's group, mean over samples."),
    # critic (GAE only)
    _m("critic_loss", "loss", "actor-mean", "Critic value loss (only with a critic, --advantage_estimator gae)."),
    _m("values", "reward", "actor-mean", "Critic value estimate (only with a critic)."),
    _m("critic_lr", "lr", "actor-mean", "Critic learning rate (only with a critic)."),
    # weight sync
    _m("sync_seconds", "s", "sync", "Whole LoRA weight sync on the first policy rank, gather to last engine done."),
    _m("sync_gather_s", "s", "sync", "Entering the ZeRO-3 gather of the adapter weights."),
    _m("sync_pack_s", "s", "sync", "Mapping names and packing the adapter into one buffer."),
    _m("sync_transfer_s", "s", "sync", "Remote round trip to the engines minus their unpack and apply time."),
    _m("sync_unpack_s", "s", "sync", "Unpacking the buffer on the slowest tensor-parallel worker."),
    _m("sync_apply_s", "s", "sync", "Applying the update on the slowest tensor-parallel worker."),
    _m("sync_delta_norm", "L2 norm", "sync", "Norm of the change of the served weights (mean over engines)."),
    _m("sync_target_norm", "L2 norm", "sync", "Norm of the intended adapter delta (scale * B @ A); compare with sync_delta_norm."),
    _m(
        "sync_served_share",
        "share",
        "derived",
        "sync_delta_norm / sync_target_norm: the share of the intended adapter update the engines serve "
        "(about 1 native; far from 1 merged while updates are small). Warn outside [0.9, 1/0.9].",
    ),
    _m("sync_changed_frac", "share", "sync", "Share of the adapted bf16 weight entries that changed (0 after the first steps: sync broken)."),
    # eval
    _m("eval/temperature", "temperature", "eval", "Sampling temperature of the eval (0 = greedy)."),
    _m("eval/n_samples_per_prompt", "samples", "eval", "Samples generated per eval prompt."),
    _m("eval/seconds", "s", "eval", "Wall time of the eval."),
)

PATTERNS: tuple[tuple[str, Metric], ...] = (
    (
        r"eval/[^/]+/(greedy|nondet_proxy|sampling)_pass@1",
        _m(
            "eval/{dataset}/{mode}_pass@1",
            "share",
            "eval",
            "Mean over the dataset's prompts of the share of correct samples. mode: greedy (T=0, n=1), "
            "nondet_proxy (T=0, n>1), sampling (T>0).",
        ),
    ),
    (
        r"eval/[^/]+/(greedy|nondet_proxy|sampling)_pass@([2-9]|[1-9][0-9]+)",
        _m("eval/{dataset}/{mode}_pass@{n}", "share", "eval", "Share of the dataset's prompts with at least one correct sample of n."),
    ),
    (
        r"eval/[^/]+/reward_mean",
        _m("eval/{dataset}/reward_mean", "reward", "eval", "Mean reward over all eval samples of the dataset."),
    ),
    (r"eval/[^/]+/prompts", _m("eval/{dataset}/prompts", "prompts", "eval", "Eval prompts of the dataset.")),
)

BY_KEY = {m.key: m for m in METRICS}


def lookup(key: str) -> Metric | None:
    """The schema entry of a key, or None when the schema does not know it."""
    if key in BY_KEY:
        return BY_KEY[key]
    for pattern, metric in PATTERNS:
        if re.fullmatch(pattern, key):
            return metric
    return None


def unknown_keys(record: dict) -> list[str]:
    """Keys of a step record that the schema does not define."""
    return sorted(k for k in record if lookup(k) is None)


def render_markdown() -> str:
    """The key reference table of docs/metrics.md."""
    lines = ["| key | unit | source | meaning |", "| --- | --- | --- | --- |"]
    rows = list(METRICS) + [m for _, m in PATTERNS]
    for m in rows:
        lines.append(f"| `{m.key}` | {m.unit} | {m.source} | {m.meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the key table of docs/metrics.md")
    parser.add_argument("--check", metavar="JSONL", help="report keys of a training_metrics.jsonl the schema lacks")
    args = parser.parse_args(argv)
    if args.check:
        import json

        unknown: set[str] = set()
        with open(args.check, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    unknown.update(unknown_keys(json.loads(line)))
        for key in sorted(unknown):
            print(key)
        return 1 if unknown else 0
    print(render_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
