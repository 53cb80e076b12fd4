"""Exact statistics of one rollout batch, and the prompt identity (metrics_experience.patch).

OpenRLHF 0.9.3 logs every ``experience.info`` key as a mean over micro-batches and ranks
(``trainer/ray/ppo_actor.py`` ``training_step`` and ``ppo_train``): a standard deviation, a
percentile or a per-prompt pass rate cannot survive that. The patch calls
:func:`rollout_batch_metrics` in ``RemoteExperienceMaker.compute_advantages_and_returns``, where
the whole batch and its rollout order (``indices``) are at hand, and the trainer merges the
result into the step's record. Key names are those of ``rft/metrics_schema.py``.

The generation KL (:mod:`rft.openrlhf.gen_kl`) is aggregated here too: each sample carries its
own token-mean k3 in ``info["gen_kl"]`` (the ``make_experience`` hook), and this module weighs
them by the sample's response tokens for the step's token mean and takes their max and p99, on
the controller, over the whole batch.

:func:`prompt_token_hash` names a prompt by its token ids, because prompts do not reach the
policy actors (the replay buffer drops them): the spike log and the samples log use it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional, Sequence

import torch

from rft.contract import PARSE_METHOD_CODES, SHARE_KEYS
from rft.openrlhf.gen_kl import SAMPLE_KEY as GEN_KL_SAMPLE_KEY
from rft.openrlhf.gen_kl import kl_of_sequences
from rft.openrlhf.stats import pass_rates, quantile_linear

logger = logging.getLogger(__name__)

HIGH_REWARD_THRESHOLD = 0.5
"""A reward above this counts as "high" for ``high_reward_but_wrong`` (a lenient judge's tell)."""

CORRECT_THRESHOLD = 0.5
"""A ``correctness`` log above this counts the sample as correct."""


def prompt_token_hash(sequence: torch.Tensor, action_mask: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-1 of one sample's prompt token ids as little-endian int64.

    ``action_mask[j]`` marks ``sequence[j + 1]`` (OpenRLHF shifts it by one), so the prompt is
    ``sequence[: first_action + 1]``; with no action token, the whole sequence. The same ids give
    the same hash in the trainer and in the policy actors.
    """
    ones = torch.nonzero(action_mask.detach().flatten().cpu().bool()).flatten()
    end = int(ones[0]) + 1 if ones.numel() else int(sequence.numel())
    ids = sequence.detach().flatten().cpu()[:end].to(torch.int64).numpy().astype("<i8")
    return hashlib.sha1(ids.tobytes()).hexdigest()[:16]


def prompt_token_hashes(sequences: torch.Tensor, action_mask: torch.Tensor) -> list[str]:
    """:func:`prompt_token_hash` of every row of a (B, S) batch."""
    return [prompt_token_hash(seq, mask) for seq, mask in zip(sequences, action_mask)]


def group_metrics(rewards: torch.Tensor, correct: Optional[torch.Tensor] = None) -> dict[str, float]:
    """GRPO group statistics of a (prompts, samples_per_prompt) reward matrix.

    ``frac_reward_zero_std`` is the share of prompts whose samples all got exactly the same reward
    (their group-normalised advantages are all zero: no learning signal). With ``correct`` (same
    shape), ``pass_at_1`` and ``pass_at_all`` as :func:`rft.openrlhf.stats.pass_rates` defines them.
    """
    rewards = rewards.double()
    out = {"frac_reward_zero_std": float((rewards.max(-1).values == rewards.min(-1).values).double().mean())}
    if correct is not None:
        out["pass_at_1"], out["pass_at_all"] = pass_rates((correct.double() > CORRECT_THRESHOLD).tolist())
    return out


def reward_metrics(rewards: torch.Tensor) -> dict[str, float]:
    """Distribution of the per-sample rewards: mean, population std, min, max, p90."""
    r = rewards.double().flatten()
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(unbiased=False)),
        "reward_min": float(r.min()),
        "reward_max": float(r.max()),
        "reward_p90": quantile_linear(r, 0.9),
    }


def info_in_order(experiences: Sequence[Any], key: str, indices: torch.Tensor) -> Optional[torch.Tensor]:
    """One ``info[key]`` value per sample in rollout order; None when a micro-batch lacks the key.

    ``indices`` maps the concatenated micro-batches back to rollout order (they differ with
    ``--use_dynamic_batch``), as ``compute_advantages_and_returns`` uses it.
    """
    if not all(key in e.info for e in experiences):
        return None
    values = torch.cat([torch.as_tensor(e.info[key]).detach().float().flatten().cpu() for e in experiences])
    if values.numel() != indices.numel():
        return None
    ordered = torch.empty_like(values)
    ordered[indices] = values
    return ordered


def tokens_in_order(experiences: Sequence[Any], indices: torch.Tensor) -> Optional[torch.Tensor]:
    """Each sample's response tokens (its ``action_mask`` sum) in rollout order, as :func:`info_in_order`."""
    counts = torch.cat([e.action_mask.detach().cpu().double().sum(-1).flatten() for e in experiences])
    if counts.numel() != indices.numel():
        return None
    ordered = torch.empty_like(counts)
    ordered[indices] = counts
    return ordered


def rollout_batch_metrics(
    experiences: Sequence[Any], shaped_rewards: torch.Tensor, indices: torch.Tensor, n_samples_per_prompt: int
) -> dict[str, float]:
    """Exact metrics of one rollout batch; ``{}`` with one warning if they cannot be computed.

    ``shaped_rewards`` is the (prompts, n) reward matrix the advantages are computed from; the
    reward distribution uses the reward function's own ``info["reward"]`` when every sample has
    it (before length penalties). A failed metric must never stop training.
    """
    try:
        return _rollout_batch_metrics(experiences, shaped_rewards, indices, n_samples_per_prompt)
    except Exception as e:  # noqa: BLE001 - metrics are diagnostics
        logger.warning(f"rollout batch metrics skipped: {type(e).__name__}: {e}")
        return {}


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean())


def _rollout_batch_metrics(experiences, shaped_rewards, indices, n_samples_per_prompt) -> dict[str, float]:
    indices = indices.cpu()
    n = max(int(n_samples_per_prompt), 1)
    out = {"rollout_samples": float(indices.numel()), "rollout_prompts": float(indices.numel() // n)}

    def ordered(key: str) -> Optional[torch.Tensor]:
        return info_in_order(experiences, key, indices)

    reward = ordered("reward")
    if reward is None:
        reward = shaped_rewards.detach().float().flatten().cpu()
    out.update(reward_metrics(reward))
    out.update({key: _mean(values) for key in SHARE_KEYS if (values := ordered(key)) is not None})
    correct = ordered("correctness")
    if correct is not None:
        wrong = correct <= CORRECT_THRESHOLD
        out["high_reward_but_wrong"] = _mean((reward > HIGH_REWARD_THRESHOLD) & wrong)
    parse = ordered("parse_method")
    if parse is not None:
        out.update({f"parse_method_{name}": _mean(parse == code) for name, code in PARSE_METHOD_CODES.items()})
    failures = ordered("reward_failures")
    if failures is not None:
        out["reward_failures"], out["reward_failures_count"] = _mean(failures), float(failures.double().sum())
    lengths = ordered("response_length")
    if lengths is not None:
        out["response_length"], out["response_length_max"] = _mean(lengths), float(lengths.max())
    truncated = ordered("truncated")
    if truncated is not None:
        out["truncated"] = _mean(truncated)
    gen_kl = ordered(GEN_KL_SAMPLE_KEY)
    tokens = tokens_in_order(experiences, indices) if gen_kl is not None else None
    if gen_kl is not None and tokens is not None:
        out.update(kl_of_sequences(gen_kl, tokens))
    groups = shaped_rewards.detach().reshape(-1, n).cpu()
    out.update(group_metrics(groups, correct.reshape(-1, n) if correct is not None else None))
    return out
