"""Small statistics shared by the rollout, actor and eval hooks: written once, tested once."""

from __future__ import annotations

from typing import Sequence

import torch


def quantile_linear(values: torch.Tensor, q: float) -> float:
    """The q-quantile of ``values`` with linear interpolation (numpy's default method); NaN when empty."""
    v = values.detach().flatten().double().sort().values
    if v.numel() == 0:
        return float("nan")
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def pass_rates(hits: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """``(pass@1, pass@all)`` over prompts, each given as its samples' correctness.

    pass@1 is the mean over prompts of the share of correct samples (the unbiased pass@1
    estimate); pass@all is the share of prompts with at least one correct sample.
    """
    if not hits or any(len(h) == 0 for h in hits):
        raise ValueError("pass_rates needs at least one prompt, each with at least one sample")
    return (sum(sum(map(bool, h)) / len(h) for h in hits) / len(hits), sum(any(h) for h in hits) / len(hits))
