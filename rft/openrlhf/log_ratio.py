"""Bound the PPO log-ratio before ``exp``, and describe its tail per micro-batch.

OpenRLHF 0.9.3's ``PolicyLoss`` exponentiates ``log_probs - old_log_probs`` with no bound
(``models/loss.py:123-124``, GSPO ``:127-130``), so one token whose probability moved far between
rollout and update gives an inf or NaN loss and a destroyed step (OpenRLHF#931; upstream clamps
at ±20 from 0.10.3). The vLLM importance-sampling weights ``exp(old_log_probs -
rollout_log_probs)`` (``:154``) are unbounded too: icepop and mis multiply an infinite weight by
a 0/1 filter, which is NaN. ``ratio_logging_loss.patch`` passes every such log-ratio through
:func:`clamp_and_record` (or clamps it with :data:`LOG_RATIO_CLAMP`); inside the bound the loss
and its gradient are bit-identical to 0.9.3.

The statistics (:data:`DIAGNOSTICS`) describe the policy log-ratio over the action tokens of one
micro-batch, before the importance-sampling branch overwrites it (padded positions carry a
log-ratio of 0 and are left out). They are stored as plain Python numbers on the loss instance,
where the actor's metrics read them; ``None`` (and ``tokens_in_batch`` 0) for a micro-batch
with no action token. Whoever combines them across micro-batches and ranks must reduce the
maxima with max, not mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rft.openrlhf.stats import quantile_linear

LOG_RATIO_CLAMP = 20.0
"""Bound of |log pi/pi_old| before exp: exp(20) ~ 4.85e8 still dominates a surrogate, yet stays far
from float32's overflow at about 88.7."""

DIAGNOSTICS = (
    "log_ratio_raw_max", "log_ratio_min", "log_ratio_max", "log_ratio_abs_p99", "ratio_max", "tokens_in_batch",
)
"""Attributes set on the loss: the largest raw log-ratio, the clamped min and max, the 99th
percentile of the clamped |log-ratio| (linear interpolation, as numpy.percentile), exp of the
clamped max, and the number of action tokens (an int, always last)."""


def tail_diagnostics(
    log_ratio: torch.Tensor, action_mask: torch.Tensor | None, bound: float = LOG_RATIO_CLAMP
) -> dict[str, Any]:
    """The :data:`DIAGNOSTICS` of one micro-batch's per-token log-ratio over its action tokens."""
    with torch.no_grad():
        raw = log_ratio.detach()
        values = (raw[action_mask.bool()] if action_mask is not None else raw.reshape(-1)).float()
        if values.numel() == 0:
            return dict.fromkeys(DIAGNOSTICS[:-1], None) | {"tokens_in_batch": 0}
        clamped = values.clamp(-bound, bound)
        raw_max, high, low = torch.stack([values.max(), clamped.max(), clamped.min()]).tolist()
        p99 = quantile_linear(clamped.abs(), 0.99)
    return {
        "log_ratio_raw_max": raw_max,
        "log_ratio_max": high,
        "log_ratio_min": low,
        "ratio_max": math.exp(high),
        "log_ratio_abs_p99": p99,
        "tokens_in_batch": int(values.numel()),
    }


def clamp_and_record(
    owner: object, log_ratio: torch.Tensor, action_mask: torch.Tensor | None, bound: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """Store the :data:`DIAGNOSTICS` of ``log_ratio`` on ``owner``, then return it clamped to ±bound."""
    for name, value in tail_diagnostics(log_ratio, action_mask, bound).items():
        setattr(owner, name, value)
    return log_ratio.clamp(-bound, bound)
