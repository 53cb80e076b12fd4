"""rft.openrlhf.rollout_stats on planted rollouts; expected values counted by hand or with numpy.

The experiences are stand-ins with the attributes the hook reads (``info``, ``sequences``,
``action_mask``); the patched OpenRLHF path that feeds it real ones is tested in
tests/test_metrics_patches.py.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rft.openrlhf.rollout_stats import (
    group_metrics,
    prompt_token_hash,
    prompt_token_hashes,
    rollout_batch_metrics,
)


def micro_batch(**info) -> SimpleNamespace:
    """One micro-batch as compute_advantages_and_returns sees it: per-sample info tensors."""
    return SimpleNamespace(info={k: torch.tensor(v, dtype=torch.float) for k, v in info.items()})


def test_group_metrics_are_per_prompt_not_per_batch():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    out = group_metrics(rewards, torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    assert out["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert out["pass_at_1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["pass_at_all"] == pytest.approx(2 / 3)
    # a group differing by 1e-12 is not zero-std: its group-normalised advantages are not 0
    assert group_metrics(torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64))["frac_reward_zero_std"] == 0.0


def test_batch_metrics_never_raise(caplog):
    assert rollout_batch_metrics(None, torch.zeros(2, 2), torch.arange(4), 2) == {}
    assert "rollout batch metrics skipped" in caplog.text


def test_prompt_hash_covers_prompt_tokens_only():
    seq = torch.tensor([5, 6, 7, 11, 12, 0])
    mask = torch.tensor([0, 0, 1, 1, 0])  # marks seq[3], seq[4]
    expected = hashlib.sha1(np.array([5, 6, 7], dtype="<i8").tobytes()).hexdigest()[:16]
    assert prompt_token_hash(seq, mask) == expected
    other_response = torch.tensor([5, 6, 7, 13, 0, 0])
    assert prompt_token_hash(other_response, torch.tensor([0, 0, 1, 0, 0])) == expected
    no_action = torch.tensor([5, 6])
    assert prompt_token_hash(no_action, torch.tensor([0])) == hashlib.sha1(np.array([5, 6], dtype="<i8").tobytes()).hexdigest()[:16]
    assert prompt_token_hashes(torch.stack([seq, other_response]), torch.stack([mask, torch.tensor([0, 0, 1, 0, 0])])) == [expected] * 2


def test_metrics_follow_rollout_order_not_micro_batch_order():
    """With --use_dynamic_batch micro-batches hold samples out of order; ``indices`` maps them back."""
    # rollout order: prompt 0 = samples 0,1 (correct 1,1), prompt 1 = samples 2,3 (correct 0,1)
    correct = [1.0, 1.0, 0.0, 1.0]
    lengths = [10.0, 20.0, 30.0, 40.0]
    order = [3, 0, 2, 1]  # the micro-batches hold samples 3, 0 | 2, 1
    batches = [
        micro_batch(**{k: [v[i] for i in order[:2]] for k, v in dict(reward=correct, correctness=correct, response_length=lengths).items()}),
        micro_batch(**{k: [v[i] for i in order[2:]] for k, v in dict(reward=correct, correctness=correct, response_length=lengths).items()}),
    ]
    shaped = torch.tensor(correct).reshape(2, 2)  # already in rollout order, as the patch passes it
    m = rollout_batch_metrics(batches, shaped, torch.tensor(order), 2)
    assert m["pass_at_1"] == pytest.approx((1.0 + 0.5) / 2) and m["pass_at_all"] == 1.0
    assert m["frac_reward_zero_std"] == 0.5
    assert m["response_length"] == 25.0 and m["response_length_max"] == 40.0
    assert m["rollout_samples"] == 4 and m["rollout_prompts"] == 2


def test_failures_parse_shares_and_high_reward_but_wrong():
    batch = micro_batch(
        reward=[0.9, 0.2, 0.0, 0.8],
        correctness=[0.0, 0.0, 0.0, 1.0],
        parse_method=[2.0, 1.0, 0.0, 2.0],
        reward_failures=[0.0, 0.0, 1.0, 0.0],
        truncated=[0.0, 1.0, 0.0, 0.0],
    )
    m = rollout_batch_metrics([batch], torch.tensor([[0.9, 0.2], [0.0, 0.8]]), torch.arange(4), 2)
    assert m["high_reward_but_wrong"] == 0.25  # sample 0 only: reward 0.9, not correct
    assert (m["parse_method_boxed"], m["parse_method_last_number"], m["parse_method_none"]) == (0.5, 0.25, 0.25)
    assert (m["reward_failures"], m["reward_failures_count"]) == (0.25, 1.0)
    assert m["truncated"] == 0.25
    r = np.array([0.9, 0.2, 0.0, 0.8])
    assert m["reward_std"] == pytest.approx(r.std()) and m["reward_p90"] == pytest.approx(np.quantile(r, 0.9))


def test_without_reward_logs_the_shaped_rewards_are_described():
    """A reward model run has no per-sample reward info from the rollout: the matrix is used."""
    m = rollout_batch_metrics([micro_batch(kl=[0.0, 0.0])], torch.tensor([[0.25, 0.75]]), torch.arange(2), 2)
    assert (m["reward_mean"], m["reward_min"], m["reward_max"]) == (0.5, 0.25, 0.75)
    assert "pass_at_1" not in m and "correctness" not in m


# ----------------------------------------------------------------------------- generation KL
def test_generation_kl_info_is_each_samples_k3_token_mean():
    from rft.openrlhf.gen_kl import generation_kl_info

    engine = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    trainer = torch.tensor([[-1.0, -1.0, 7.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # a masked-out 7.0; a sample without tokens
    got = generation_kl_info(engine, trainer, mask)
    # log r = 0 and 1 -> (0 + e - 2) / 2; log r = -1 -> 1/e; no tokens -> 0 (weight 0 in the step)
    assert set(got) == {"gen_kl"} and got["gen_kl"].dtype == torch.float32
    np.testing.assert_allclose(got["gen_kl"].numpy(), [(np.e - 2) / 2, 1 / np.e, 0.0], rtol=1e-6)


def test_generation_kl_info_without_engine_logprobs_adds_nothing():
    from rft.openrlhf.gen_kl import generation_kl_info

    assert generation_kl_info(None, torch.zeros(2, 3), torch.ones(2, 3)) == {}


def test_a_failed_generation_kl_keeps_the_key_as_nan_and_warns(caplog):
    """Key sets must match on every sample (the actors reduce them); the step then reads NaN."""
    from rft.openrlhf.gen_kl import generation_kl_info

    got = generation_kl_info(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    assert got["gen_kl"].shape == (2,) and bool(torch.isnan(got["gen_kl"]).all())
    assert "generation KL of a micro-batch skipped" in caplog.text


def gen_kl_batch(means: list[float], lengths: list[int], width: int = 6) -> SimpleNamespace:
    mask = torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return SimpleNamespace(info={"gen_kl": torch.tensor(means), "reward": torch.zeros(len(means))}, action_mask=mask)


def test_step_generation_kl_weighs_samples_by_tokens_in_rollout_order():
    # micro-batches hold rollout samples [2, 0] and [3, 1]; lengths 1, 4, 2, 5
    batches = [gen_kl_batch([0.4, 0.01], [2, 1]), gen_kl_batch([0.0, 0.02], [5, 4])]
    indices = torch.tensor([2, 0, 3, 1])
    out = rollout_batch_metrics(batches, torch.zeros(2, 2), indices, 2)
    means, tokens = np.array([0.01, 0.02, 0.4, 0.0]), np.array([1, 4, 2, 5])
    assert out["gen_kl"] == pytest.approx((means * tokens).sum() / tokens.sum(), rel=1e-6)  # 0.89 / 12
    assert out["gen_kl"] == pytest.approx(0.89 / 12, rel=1e-6)
    assert out["gen_kl_seq_max"] == pytest.approx(0.4, rel=1e-6)
    assert out["gen_kl_seq_p99"] == pytest.approx(np.quantile(means, 0.99), rel=1e-6)


def test_step_generation_kl_leaves_out_samples_without_tokens_and_reports_nan():
    batches = [gen_kl_batch([0.0, 0.5], [0, 2])]
    out = rollout_batch_metrics(batches, torch.zeros(1, 2), torch.arange(2), 2)
    assert (out["gen_kl"], out["gen_kl_seq_max"], out["gen_kl_seq_p99"]) == pytest.approx((0.5, 0.5, 0.5))
    nan = rollout_batch_metrics([gen_kl_batch([float("nan"), 0.5], [3, 2])], torch.zeros(1, 2), torch.arange(2), 2)
    assert all(np.isnan(nan[k]) for k in ("gen_kl", "gen_kl_seq_max", "gen_kl_seq_p99"))
