"""Exact statistics of one policy update, per global step: what ``metrics_actor.patch`` calls.

OpenRLHF 0.9.3's ``ActorPPOTrainer.ppo_train`` mean-reduces every status value over ranks
(``strategy.all_reduce``) and over micro-steps (``trainer/ray/ppo_actor.py:188-216``). That
turns a maximum into a mean of maxima and a percentile into a mean of percentiles, and it has
no notion of optimizer steps: DeepSpeed's grad norm exists only at accumulation boundaries
(``None`` before the first step). So each rank keeps raw accumulations here instead:

* per micro-batch (:meth:`ActorStepMetrics.add_micro_batch`): advantages and token entropies
  over action tokens, the ratio-tail attributes that the loss patch leaves on ``PolicyLoss``
  (``RATIO_MAX_KEYS``, ``RATIO_MIN_KEYS``, ``tokens_in_batch``) and the prompts' token hashes;
* per optimizer step (:meth:`ActorStepMetrics.optimizer_stepped`): DeepSpeed's global grad norm
  before clipping, only when that step was an accumulation boundary;

and :meth:`ActorStepMetrics.finalize` gathers every rank's record with one collective and
combines them exactly (:func:`combine_rank_records`): the same result on every rank. The
status keys of each micro-step are left alone, so every rank still all-reduces one key set.

A metric never stops training: a malformed micro-batch is counted (``metric_errors``) and
logged once.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.distributed

from rft.openrlhf.rollout_stats import prompt_token_hashes
from rft.openrlhf.stats import quantile_linear

logger = logging.getLogger(__name__)

RATIO_MAX_KEYS = ("log_ratio_raw_max", "log_ratio_max", "ratio_max", "log_ratio_abs_p99")
"""PolicyLoss diagnostics reduced with max across micro-batches, optimizer steps and ranks."""
RATIO_MIN_KEYS = ("log_ratio_min",)
"""PolicyLoss diagnostics reduced with min across micro-batches, optimizer steps and ranks."""


def accumulation_boundary(engine: Any) -> bool:
    """Whether the next ``engine.step()`` takes an optimizer step (DeepSpeed's semantics).

    True for an object without ``is_gradient_accumulation_boundary`` (every step is one);
    False when asking raises, so that a failing query logs no grad norm rather than a wrong one.
    """
    fn = getattr(engine, "is_gradient_accumulation_boundary", None)
    if not callable(fn):
        return True
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a metric must never stop training
        return False


def global_grad_norm(engine: Any) -> Optional[float]:
    """DeepSpeed's global grad norm before clipping, as a float; None before the first optimizer step."""
    fn = getattr(engine, "get_global_grad_norm", None)
    try:
        value = fn() if callable(fn) else None
        return None if value is None else float(value)
    except Exception:  # noqa: BLE001 - a metric must never stop training
        return None


def _fold(acc: dict[str, float], key: str, value: float, op: Callable[[float, float], float]) -> None:
    """Reduce ``value`` into ``acc[key]`` with ``op``; the first value seeds it (no sentinel to leak out)."""
    acc[key] = value if key not in acc else op(acc[key], value)


def _ratio_op(key: str) -> Callable[[float, float], float]:
    """How a ratio-tail key reduces: a maximum stays a maximum, a minimum a minimum."""
    return max if key in RATIO_MAX_KEYS else min


class ActorStepMetrics:
    """Raw statistics of one rank's micro-batches during one ``ppo_train`` call."""

    def __init__(self) -> None:
        self.adv_count = 0
        self.adv_sum = 0.0
        self.adv_sumsq = 0.0
        self.adv_max = float("-inf")
        self.adv_min = float("inf")
        self.entropy: list[torch.Tensor] = []
        self.ratio: dict[str, float] = {}
        self.tokens = 0.0
        self.pending_ratio: dict[str, float] = {}
        self.pending_hashes: list[str] = []
        self.optimizer_steps: list[dict[str, Any]] = []
        self.errors = 0
        self.at_boundary = True

    def add_micro_batch(self, experience: Any, output: Any, loss_fn: Any, engine: Any = None) -> None:
        """Record advantages, token entropies, ratio tails and prompt hashes of one micro-batch.

        Call it before ``backward``; ``engine`` (the DeepSpeed engine) says whether the coming
        optimizer step is an accumulation boundary (:meth:`optimizer_stepped` reads it).
        """
        self.at_boundary = accumulation_boundary(engine)
        try:
            self._add_micro_batch(experience, output, loss_fn)
        except Exception as e:  # noqa: BLE001 - a metric must never stop training
            self.errors += 1
            if self.errors == 1:
                logger.warning(f"policy step metrics: micro-batch skipped: {type(e).__name__}: {e}")

    def _add_micro_batch(self, experience: Any, output: Any, loss_fn: Any) -> None:
        mask = experience.action_mask.bool()
        adv = experience.advantages.detach()[mask].double()
        if adv.numel():
            self.adv_count += adv.numel()
            self.adv_sum += float(adv.sum())
            self.adv_sumsq += float((adv * adv).sum())
            self.adv_max = max(self.adv_max, float(adv.max()))
            self.adv_min = min(self.adv_min, float(adv.min()))
        entropy = getattr(output, "entropy", None) if output is not None else None
        if entropy is not None:
            # the actor returns entropies over the whole sequence; action tokens are the last columns
            self.entropy.append(entropy[:, -mask.shape[1] :].detach()[mask].float().cpu())
        for key in RATIO_MAX_KEYS + RATIO_MIN_KEYS:
            value = getattr(loss_fn, key, None)
            if value is not None:
                _fold(self.ratio, key, float(value), _ratio_op(key))
                _fold(self.pending_ratio, key, float(value), _ratio_op(key))
        tokens = getattr(loss_fn, "tokens_in_batch", None)
        if tokens is not None:
            self.tokens += float(tokens)
        self.pending_hashes.extend(prompt_token_hashes(experience.sequences, experience.action_mask))

    def optimizer_stepped(self, engine: Any) -> None:
        """After ``strategy.optimizer_step``: close a record if that step was an accumulation boundary."""
        if self.at_boundary:
            self.add_optimizer_step(global_grad_norm(engine))

    def add_optimizer_step(self, grad_norm: Optional[float]) -> None:
        """Close the micro-batches since the last optimizer step into one record."""
        hashes = list(dict.fromkeys(self.pending_hashes))
        self.optimizer_steps.append({"grad_norm": grad_norm, "prompt_hashes": hashes, **self.pending_ratio})
        self.pending_ratio, self.pending_hashes = {}, []

    def local_record(self) -> dict[str, Any]:
        """Plain, picklable summary of this rank."""
        entropy = torch.cat(self.entropy) if self.entropy else torch.zeros(0)
        return {
            "adv": [self.adv_count, self.adv_sum, self.adv_sumsq, self.adv_max, self.adv_min],
            "entropy": entropy,
            "ratio": dict(self.ratio),
            "tokens": self.tokens,
            "optimizer_steps": list(self.optimizer_steps),
            "errors": self.errors,
        }

    def finalize(self) -> dict[str, Any]:
        """Gather every rank's record and combine them; the same result on every rank.

        Every rank must call it (one collective); ``{}`` if combining fails.
        """
        records = gather_rank_records(self.local_record())
        try:
            return combine_rank_records(records)
        except Exception as e:  # noqa: BLE001 - a metric must never stop training
            logger.warning(f"policy step metrics skipped: {type(e).__name__}: {e}")
            return {}


def gather_rank_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """All ranks' records: one ``all_gather_object`` when torch.distributed runs with several ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        records: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(records, record)
        return records
    return [record]


def combine_rank_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact step statistics from every rank's :meth:`ActorStepMetrics.local_record`.

    Advantage and entropy statistics are over all action tokens of the step (every rank,
    micro-batch and epoch); the std is the population std. Ratio-tail maxima are maxima,
    ``log_ratio_min`` a minimum and ``log_ratio_abs_p99`` the largest per-micro-batch p99 (an
    upper bound of the step's p99). ``grad_norm`` is the mean over the step's optimizer steps
    that have a norm, ``grad_norm_max`` their max; ``optimizer_step_details`` lists each
    optimizer step (rank 0's grad norm, which DeepSpeed makes global, the ranks' ratio tails
    combined, and every rank's prompt hashes) for the trainer's spike log.
    """
    out: dict[str, Any] = {}
    count = sum(r["adv"][0] for r in records)
    if count:
        mean = sum(r["adv"][1] for r in records) / count
        var = max(sum(r["adv"][2] for r in records) / count - mean * mean, 0.0)
        out.update(
            advantage_mean=mean,
            advantage_std=math.sqrt(var),
            advantage_max=max(r["adv"][3] for r in records),
            advantage_min=min(r["adv"][4] for r in records),
        )
    entropy = torch.cat([r["entropy"].double().flatten() for r in records])
    if entropy.numel():
        out.update(
            entropy_mean=float(entropy.mean()),
            entropy_p10=quantile_linear(entropy, 0.1),
            entropy_p90=quantile_linear(entropy, 0.9),
        )
    for key in RATIO_MAX_KEYS + RATIO_MIN_KEYS:
        values = [r["ratio"][key] for r in records if key in r["ratio"]]
        if values:
            out[key] = max(values) if key in RATIO_MAX_KEYS else min(values)
    if any(r["ratio"] for r in records) or any(r["tokens"] for r in records):
        out["trained_tokens"] = float(sum(r["tokens"] for r in records))
    steps = []
    for per_rank in zip(*[r["optimizer_steps"] for r in records]):
        merged: dict[str, Any] = {"grad_norm": per_rank[0]["grad_norm"], "prompt_hashes": []}
        for key in RATIO_MAX_KEYS + RATIO_MIN_KEYS:
            values = [s[key] for s in per_rank if key in s]
            if values:
                merged[key] = max(values) if key in RATIO_MAX_KEYS else min(values)
        merged["prompt_hashes"] = list(dict.fromkeys(h for s in per_rank for h in s["prompt_hashes"]))
        steps.append(merged)
    norms = [s["grad_norm"] for s in steps if s["grad_norm"] is not None]
    out["optimizer_steps"] = float(len(steps))
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
        out["grad_norm_max"] = max(norms)
    out["metric_errors"] = float(sum(r["errors"] for r in records))
    out["optimizer_step_details"] = steps
    return out
