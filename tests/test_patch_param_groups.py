"""lora_param_groups.patch: the empty no-decay optimizer group is left out before the scheduler.

The whole behaviour (a LoRA step of the patched actor under ZeRO-3 on torch 2.10) runs in
``tests/test_e2e_tiny.py``, which fails at its first optimizer step without this patch. Here: why
the patch is needed (torch's strict pairing of groups and LRs), a canary on the pristine lines it
changes, and that the patched file builds the scheduler from the filtered groups.
"""

from __future__ import annotations

import pytest
import torch

import oprl

FILE = "openrlhf/trainer/ray/ppo_actor.py"
CREATE = "actor_optim = strategy.create_optimizer("
FILTER = 'actor_optim.param_groups = [group for group in actor_optim.param_groups if group["params"]]'


def _scheduler_after_dropping_a_group(drop_empty_first: bool) -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optim = torch.optim.AdamW([{"params": [weight]}, {"params": [], "weight_decay": 0.0}], lr=1.0)
    if drop_empty_first:
        optim.param_groups = [g for g in optim.param_groups if g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    # ZeRO-3's optimizer keeps only groups with parameters, after the scheduler was built
    optim.param_groups = [g for g in optim.param_groups if g["params"]]
    weight.grad = torch.ones(2)
    optim.step()
    scheduler.step()


def test_torch_rejects_a_scheduler_that_counted_an_empty_group():
    with pytest.raises(ValueError, match="zip"):
        _scheduler_after_dropping_a_group(drop_empty_first=False)
    _scheduler_after_dropping_a_group(drop_empty_first=True)


def test_canary_pristine_builds_the_scheduler_right_after_the_optimizer(pristine_root):
    src = (pristine_root / FILE).read_text()
    assert src.count(CREATE) == 1 and FILTER not in src
    after = src[src.index(CREATE):]
    assert after.index("get_scheduler(") < after.index("strategy.prepare(")


def test_patched_filters_the_groups_before_the_scheduler(patched_root):
    src = (patched_root / FILE).read_text()
    after = src[src.index(CREATE):]
    assert FILTER in after
    assert after.index(FILTER) < after.index("get_scheduler(")
    assert "lora_param_groups.patch" in oprl.series_names()
