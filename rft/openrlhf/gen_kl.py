"""How far the engines' sampling policy is from the trainer's: the generation KL of every step.

GRPO's importance ratios assume the rollouts come from the policy the trainer holds. The
engines return the log-prob of every token they sampled (``SamplingParams(logprobs=1)``); the
trainer recomputes old log-probs of the same tokens. With ``log r = logp_train - logp_gen`` on
tokens sampled from the engine, the k3 estimator ``r - 1 - log r`` (Schulman, "Approximating KL
divergence", 2020) is non-negative per token and unbiased for ``KL(P_gen || P_train)``. NeMo-RL
logs the same quantity as ``gen_kl_error`` (token mean; ``nemo_rl/algorithms/loss/loss_functions.py``).

* :func:`generation_kl`: the token mean over the action mask, and the max and p99 of the
  per-sequence means (a few broken sequences hide in a batch mean);
* :func:`generation_kl_info`: the per-sample part, the hook of ``make_experience``
  (metrics_experience.patch), where the engine's log-probs (``rollout_log_probs``) meet the
  trainer's old ones; :func:`kl_of_sequences` then aggregates the whole step exactly
  (``rollout_stats``), on the controller, so no max or p99 is ever averaged across ranks;
* :func:`served_share`, :func:`gen_kl_verdict` and the thresholds with their reasons live in
  :mod:`rft.policy_drift` (no torch there: ``check_run.py`` reads them) and are named here too.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from rft.openrlhf.stats import quantile_linear
from rft.policy_drift import (  # noqa: F401 - the limits and verdicts live where check_run.py reads them
    GEN_KL_STOP,
    GEN_KL_SUSTAINED,
    GEN_KL_WARN,
    SERVED_SHARE_WARN,
    gen_kl_verdict,
    served_share,
)

logger = logging.getLogger(__name__)

GEN_KL_KEYS = ("gen_kl", "gen_kl_seq_max", "gen_kl_seq_p99")
"""The keys :func:`generation_kl` returns, in the order of its docstring."""
SAMPLE_KEY = "gen_kl"
"""``experience.info`` key of each sample's own token-mean k3; the step's exact ``gen_kl``
replaces the policy ranks' mean of it in the record (``TrainerRunLog.finish_step``)."""
ROLLOUT_LOGPROBS = 1
"""``SamplingParams.logprobs`` of every rollout: vLLM then returns the sampled token's log-prob
(plus the top-1, the same token under greedy). 0.9.3 asks only with --enable_vllm_is_correction
(``experience_maker.py:372``); the loss still reads them only then (``models/loss.py:127,152``)."""
LOG_RATIO_CLAMP = 20.0
"""``|log r|`` is clamped here before ``exp``: a token the engine gave probability 0 (log-prob
-inf) must show as a huge KL, not as inf or NaN that would hide every other step's value."""


def sequence_k3(
    engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, action_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of the k3 terms over masked tokens, and the count of those tokens.

    All three are ``(sequences, tokens)``; float64 results of shape ``(sequences,)``.
    """
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != action_mask.shape:
        raise ValueError(
            f"generation_kl: shapes differ (engine {tuple(engine_logprobs.shape)}, trainer "
            f"{tuple(trainer_logprobs.shape)}, mask {tuple(action_mask.shape)}); pass the same tokens"
        )
    mask = action_mask.detach().cpu().to(torch.float64)
    trainer, engine = trainer_logprobs.detach().cpu().double(), engine_logprobs.detach().cpu().double()
    log_ratio = (trainer - engine).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = (log_ratio.exp() - 1 - log_ratio) * mask
    return k3.sum(-1), mask.sum(-1)


def kl_of_sequences(seq_means: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """:data:`GEN_KL_KEYS` from per-sequence token means and token counts (the step's exact values).

    The token mean weighs each sequence by its tokens; max and p99 are over sequences with at
    least one token. NaN for all three when there is none; a NaN sequence (a failed hook, a NaN
    log-prob) makes the step NaN, which ``check_run.py`` reports, rather than being left out.
    """
    means, counts = seq_means.detach().double().flatten(), tokens.detach().double().flatten()
    keep = counts > 0
    if not bool(keep.any()):
        return dict.fromkeys(GEN_KL_KEYS, float("nan"))
    means, counts = means[keep], counts[keep]
    return {
        "gen_kl": float((means * counts).sum() / counts.sum()),
        "gen_kl_seq_max": float(means.max()),
        "gen_kl_seq_p99": quantile_linear(means, 0.99),
    }


def generation_kl_info(
    engine_logprobs: Optional[torch.Tensor], trainer_logprobs: torch.Tensor, action_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The ``experience.info`` entry of a micro-batch: each sample's token-mean k3 (the hook).

    ``{}`` when the engine returned no log-probs (then no sample of the step has them, so the
    key sets stay equal); a sample without response tokens gets 0.0 (weight 0 in the step's
    mean). A failure gives NaN per sample and one warning, never an exception: the key must be
    in every sample whatever happens, and a metric must not stop training.
    """
    if engine_logprobs is None:
        return {}
    try:
        sums, tokens = sequence_k3(engine_logprobs, trainer_logprobs, action_mask)
        return {SAMPLE_KEY: (sums / tokens.clamp(min=1)).float()}
    except Exception as e:  # noqa: BLE001 - a diagnostic
        logger.warning(f"generation KL of a micro-batch skipped: {type(e).__name__}: {e}")
        return {SAMPLE_KEY: torch.full((int(action_mask.shape[0]),), float("nan"))}


def generation_kl(
    engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, action_mask: torch.Tensor
) -> dict[str, float]:
    """k3 KL between the engine's and the trainer's policy on the engine's sampled tokens.

    All three are ``(sequences, tokens)``; ``action_mask`` is 1 on response tokens. Returns
    ``gen_kl`` (mean over every masked token of the batch), ``gen_kl_seq_max`` and
    ``gen_kl_seq_p99`` (max and p99, linear interpolation, of the per-sequence token means;
    sequences without a masked token are left out). NaN for all three without masked tokens.
    """
    sums, tokens = sequence_k3(engine_logprobs, trainer_logprobs, action_mask)
    return kl_of_sequences(sums / tokens.clamp(min=1), tokens)
