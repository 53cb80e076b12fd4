"""rft.openrlhf.eval_modes on planted eval samples; pass rates counted by hand.

The samples are stand-ins with what ``generate_eval_samples`` returns per sample (``prompts``,
``rewards``, ``info``); the patched ``PPOTrainer.evaluate`` and the generation count are tested
on the real OpenRLHF tree in tests/test_metrics_trainer.py.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from rft.openrlhf.eval_modes import eval_logs, eval_metrics, eval_mode, group_eval_samples


def sample(prompt: str, correct: float, reward: float | None = None, with_correctness: bool = True) -> SimpleNamespace:
    """One eval sample as the sample generator makes it (one prompt, one reward)."""
    reward = correct if reward is None else reward
    info = {"reward": torch.tensor([reward])}
    if with_correctness:
        info["correctness"] = torch.tensor([correct])
    return SimpleNamespace(prompts=[prompt], rewards=torch.tensor([reward]), info=info)


def planted(groups: list[list[float]]) -> list[SimpleNamespace]:
    return [sample(f"q{p}", float(c)) for p, corrects in enumerate(groups) for c in corrects]


def test_pass_at_k_per_datasource_on_planted_groups():
    samples = planted([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    logs = eval_logs(samples, {"q0": "aime", "q1": "aime", "q2": "ood", "q3": "ood"}, {"n_samples_per_prompt": 4, "temperature": 0.6})
    assert logs["aime/sampling_pass@1"] == pytest.approx((0.25 + 0) / 2)
    assert logs["aime/sampling_pass@4"] == pytest.approx(0.5)
    assert logs["ood/sampling_pass@1"] == pytest.approx((1 + 0.5) / 2)
    assert logs["ood/sampling_pass@4"] == pytest.approx(1.0)
    assert logs["aime/prompts"] == 2 and logs["temperature"] == 0.6 and logs["n_samples_per_prompt"] == 4.0
    assert logs["ood/reward_mean"] == pytest.approx(6 / 8)
    assert not [k for k in logs if k.endswith("pass1") or k.startswith("eval_")]  # never a bare pass1


def test_greedy_eval_with_one_sample_is_one_prompt_per_sample():
    logs = eval_logs(planted([[1], [0], [1], [1], [0]]), {}, {"n_samples_per_prompt": 1, "temperature": 0.0})
    assert logs["default/greedy_pass@1"] == pytest.approx(0.6) and logs["default/prompts"] == 5
    assert not [k for k in logs if "pass@" in k and not k.endswith("greedy_pass@1")]


def test_correctness_log_wins_over_a_lenient_reward():
    """A judge-like reward of 0.8 on a wrong answer: pass rates follow correctness, reward_mean the reward."""
    samples = [sample("q0", 0.0, reward=0.8), sample("q0", 1.0, reward=1.0)]
    logs = eval_metrics(group_eval_samples(samples, 2), {}, 1.0, 2)
    assert logs["default/sampling_pass@1"] == 0.5 and logs["default/reward_mean"] == pytest.approx(0.9)
    # without a correctness log, a reward above 0.5 counts as correct
    samples = [sample("q0", 0.0, reward=0.8, with_correctness=False), sample("q0", 0.0, with_correctness=False)]
    assert eval_metrics(group_eval_samples(samples, 2), {}, 1.0, 2)["default/sampling_pass@1"] == 0.5


def test_eval_groups_by_prompt_when_chunks_are_mixed(caplog):
    samples = planted([[1, 0], [0, 0]])
    samples = [samples[0], samples[2], samples[1], samples[3]]  # interleaved
    with caplog.at_level(logging.WARNING):
        groups = group_eval_samples(samples, 2)
    assert sorted((p, c) for p, c, _ in groups) == [("q0", [1.0, 0.0]), ("q1", [0.0, 0.0])]
    assert len([r for r in caplog.records if "do not form contiguous groups of 2" in r.getMessage()]) == 1


def test_a_count_that_does_not_divide_the_samples_groups_by_prompt():
    """Three samples read with n=2 (what 0.9.3's mismatch produces): grouped by text, not cut blindly."""
    groups = group_eval_samples(planted([[1], [0], [1]]), 2)
    assert sorted((p, c) for p, c, _ in groups) == [("q0", [1.0]), ("q1", [0.0]), ("q2", [1.0])]


@pytest.mark.parametrize(
    ("temperature", "n", "mode"), [(0.0, 1, "greedy"), (0.0, 8, "nondet_proxy"), (0.6, 8, "sampling"), (1.0, 1, "sampling")]
)
def test_eval_mode_labels(temperature, n, mode):
    assert eval_mode(temperature, n) == mode
