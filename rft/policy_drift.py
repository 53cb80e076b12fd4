"""Limits and verdicts of the engine-vs-trainer drift: generation KL and served share of the update.

The measure itself (k3 over the engine's sampled tokens) is :mod:`rft.openrlhf.gen_kl`, run
inside the trainer; this module holds what ``check_run.py`` needs to judge a run's records and
imports nothing heavy, so the health report runs where torch is not installed.

Where the numbers come from (NeMo-RL's A/B of merged against native LoRA sync on an MoE,
NeMo-RL #3964 with figures in Automodel #3845, and NeMo-RL's gpt-oss-20b release test):
native adapters measured a mean generation KL of 0.002 (max 0.0028), the merged bf16 sync a
mean of 0.051 (max 0.447), and the release test requires a mean under 0.002.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
"""Warn when the engines serve less than this share of the intended update, or more than its
inverse: native LoRA serves about 1 (only A and B are rounded to bf16), the merged sync far less
while updates are small, and its rounding can move entries the update did not touch, which
raises the norm of the served change without serving the update."""


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
