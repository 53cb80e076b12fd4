"""How far the engines' sampling policy is from the trainer's: the generation KL of every step.

GRPO's importance ratios assume the rollouts come from the policy the trainer holds. The
engines return the log-prob of every token they sampled (``SamplingParams(logprobs=1)``); the
trainer recomputes old log-probs of the same tokens. With ``log r = logp_train - logp_gen`` on
tokens sampled from the engine, the k3 estimator ``r - 1 - log r`` (Schulman, "Approximating KL
divergence", 2020) is non-negative per token and unbiased for ``KL(P_gen || P_train)``. NeMo-RL
logs the same quantity as ``gen_kl_error`` (token mean; ``nemo_rl/algorithms/loss/loss_functions.py``).

* :func:`generation_kl`: the token mean over the action mask, and the max and p99 of the
  per-sequence means (a few broken sequences hide in a batch mean);
* :func:`served_share`: the share of the intended update the engines serve, from the norms the
  sync already reports (``sync_delta_norm`` / ``sync_target_norm``);
* :func:`gen_kl_verdict`: the verdict ``check_run.py`` gives a run's series.

The thresholds are named constants with their reasons below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rft.openrlhf.stats import quantile_linear

GEN_KL_KEYS = ("gen_kl", "gen_kl_seq_max", "gen_kl_seq_p99")
"""The keys :func:`generation_kl` returns, in the order of its docstring."""
LOG_RATIO_CLAMP = 20.0
"""``|log r|`` is clamped here before ``exp``: a token the engine gave probability 0 (log-prob
-inf) must show as a huge KL, not as inf or NaN that would hide every other step's value."""
GEN_KL_WARN = 0.002
"""Warn above this token mean: NeMo-RL's gpt-oss-20b release test requires a mean generation KL
under 0.002, and native adapters measured a mean of 0.002 (max 0.0028) in its A/B (NeMo-RL #3964)."""
GEN_KL_STOP = 0.02
"""Advise stopping when the token mean stays above this: in that A/B the merged sync had a mean
of 0.051 with 14 of 50 steps above 0.02, and prime-rl's merge bar is 0.015; past it the ratios
correct a different policy than the one sampled."""
GEN_KL_SUSTAINED = 5
"""Consecutive steps above :data:`GEN_KL_STOP` that make it sustained (one spike is not)."""
SERVED_SHARE_WARN = 0.9
"""Warn when the engines serve less than this share of the intended update: native LoRA serves
about 1 (only A and B are rounded to bf16), the merged sync far less while updates are small."""


def generation_kl(
    engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, action_mask: torch.Tensor
) -> dict[str, float]:
    """k3 KL between the engine's and the trainer's policy on the engine's sampled tokens.

    All three are ``(sequences, tokens)``; ``action_mask`` is 1 on response tokens. Returns
    ``gen_kl`` (mean over every masked token of the batch), ``gen_kl_seq_max`` and
    ``gen_kl_seq_p99`` (max and p99, linear interpolation, of the per-sequence token means;
    sequences without a masked token are left out). NaN for all three without masked tokens.
    """
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != action_mask.shape:
        raise ValueError(
            f"generation_kl: shapes differ (engine {tuple(engine_logprobs.shape)}, trainer "
            f"{tuple(trainer_logprobs.shape)}, mask {tuple(action_mask.shape)}); pass the same tokens"
        )
    mask = action_mask.to(torch.float64)
    log_ratio = (trainer_logprobs.double() - engine_logprobs.double()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = (log_ratio.exp() - 1 - log_ratio) * mask
    tokens = mask.sum(-1)
    total = float(tokens.sum())
    if total == 0:
        return dict.fromkeys(GEN_KL_KEYS, float("nan"))
    per_seq = k3.sum(-1)[tokens > 0] / tokens[tokens > 0]
    return {
        "gen_kl": float(k3.sum()) / total,
        "gen_kl_seq_max": float(per_seq.max()),
        "gen_kl_seq_p99": quantile_linear(per_seq, 0.99),
    }


def served_share(delta_norm: float, target_norm: float) -> float:
    """The share of the intended update the engines serve: ``|served change| / |intended change|``.

    From the sync's ``sync_delta_norm`` and ``sync_target_norm``. An update of zero is served
    whole (1.0). In merged mode rounding can also move entries the update barely touched, so
    the ratio can exceed the share that points the right way; below 1 it is the lost part.
    """
    if target_norm < 0 or delta_norm < 0 or math.isnan(target_norm) or math.isnan(delta_norm):
        raise ValueError(f"served_share: norms must be non-negative numbers, got {delta_norm} and {target_norm}")
    if target_norm == 0:
        return 1.0 if delta_norm == 0 else math.inf
    return delta_norm / target_norm


def gen_kl_verdict(series: Sequence[float]) -> str:
    """``ok``, ``warn`` or ``stop`` for a run's per-step ``gen_kl`` (NaN steps are skipped).

    ``stop`` when the last :data:`GEN_KL_SUSTAINED` values are all above :data:`GEN_KL_STOP`;
    ``warn`` when the last value is above :data:`GEN_KL_WARN`.
    """
    values = [v for v in series if not math.isnan(v)]
    if not values:
        return "ok"
    tail = values[-GEN_KL_SUSTAINED:]
    if len(tail) == GEN_KL_SUSTAINED and min(tail) > GEN_KL_STOP:
        return "stop"
    return "warn" if values[-1] > GEN_KL_WARN else "ok"
