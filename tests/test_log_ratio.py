"""rft/openrlhf/log_ratio.py on its own: the clamp and the tail statistics ratio_logging_loss.patch stores.

Expected values come from numpy or are written out; the patched ``PolicyLoss`` of OpenRLHF 0.9.3
calling this module, against the pristine one, is tested in ``tests/test_patch_loss.py``.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from rft import metrics_schema
from rft.openrlhf import log_ratio


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [3, 10] log-ratio with a mask; action tokens carry +80 and -50, a padded one +300."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 10, generator=gen) * 0.3
    mask = torch.ones(3, 10)
    mask[0, 7:] = 0
    mask[2, :2] = 0
    values[1, 4], values[2, 6], values[0, 8] = 80.0, -50.0, 300.0
    return values, mask


def test_statistics_over_action_tokens_match_numpy():
    values, mask = planted()
    stats = log_ratio.tail_diagnostics(values, mask)
    action = values[mask.bool()].numpy().astype(np.float64)
    clamped = np.clip(action, -20, 20)
    assert stats["tokens_in_batch"] == 25
    assert stats["log_ratio_raw_max"] == 80.0  # not the padded 300
    assert stats["log_ratio_max"] == 20.0 and stats["log_ratio_min"] == -20.0
    assert stats["ratio_max"] == pytest.approx(4.851651954097903e8, rel=1e-12)  # exp(20)
    assert stats["log_ratio_abs_p99"] == pytest.approx(np.percentile(np.abs(clamped), 99), rel=1e-6)
    assert set(stats) == set(log_ratio.DIAGNOSTICS)
    assert all(type(stats[k]) is float for k in log_ratio.DIAGNOSTICS[:-1]) and type(stats["tokens_in_batch"]) is int


def test_ordinary_log_ratios_are_described_unclamped():
    values, mask = planted(seed=1)
    values[1, 4] = values[2, 6] = 0.0
    stats = log_ratio.tail_diagnostics(values, mask)
    action = values[mask.bool()]
    assert stats["log_ratio_raw_max"] == stats["log_ratio_max"] == action.max().item()
    assert stats["log_ratio_min"] == action.min().item()
    assert stats["ratio_max"] == pytest.approx(math.exp(action.max().item()), rel=1e-12)


def test_without_a_mask_every_token_counts():
    values, _ = planted()
    stats = log_ratio.tail_diagnostics(values, None)
    assert stats["tokens_in_batch"] == 30 and stats["log_ratio_raw_max"] == 300.0


def test_a_micro_batch_without_action_tokens_has_no_statistics():
    values, _ = planted()
    stats = log_ratio.tail_diagnostics(values, torch.zeros_like(values))
    assert stats == dict.fromkeys(log_ratio.DIAGNOSTICS[:-1]) | {"tokens_in_batch": 0}


def test_clamp_and_record_stores_the_statistics_and_bounds_the_ratio():
    values, mask = planted()
    owner = types.SimpleNamespace()
    values.requires_grad_(True)
    clamped = log_ratio.clamp_and_record(owner, values, mask)
    assert set(vars(owner)) == set(log_ratio.DIAGNOSTICS)
    assert (owner.tokens_in_batch, owner.log_ratio_raw_max, owner.log_ratio_max, owner.log_ratio_min) == (25, 80.0, 20.0, -20.0)
    assert clamped.max().item() == 20.0 and clamped.min().item() == -20.0
    inside = values.detach().abs() < 20
    assert torch.equal(clamped.detach()[inside], values.detach()[inside])  # bit-identical inside the bound
    clamped.sum().backward()
    assert torch.equal(values.grad, inside.float())  # a clamped token no longer moves the update
    assert torch.isfinite(clamped.float().exp()).all()


def test_the_bound_leaves_exp_finite_in_float32_and_bf16():
    bound = torch.tensor(log_ratio.LOG_RATIO_CLAMP)
    assert log_ratio.LOG_RATIO_CLAMP == 20.0
    assert torch.isfinite(bound.exp()) and torch.isfinite(bound.to(torch.bfloat16).exp())


def test_every_statistic_but_the_token_count_is_a_metric_of_the_schema():
    """The actor logs them under the same names (metrics_actor.patch reads them off the loss)."""
    assert [k for k in log_ratio.DIAGNOSTICS if metrics_schema.lookup(k) is None] == ["tokens_in_batch"]
