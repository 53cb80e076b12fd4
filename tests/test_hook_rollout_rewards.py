"""rft.openrlhf.rollout_rewards on its own: guarded rewards, filtered extra_logs, aligned keys.

The info dicts are built here the way OpenRLHF 0.9.3's ``_process_response_into_experience``
builds them; the patched OpenRLHF path (and pristine 0.9.3 failing) is tested in
tests/test_patch_experience.py.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rft.openrlhf import rollout_rewards
from rft.openrlhf.rollout_rewards import add_extra_logs, align_info_keys, finite_reward, guard_rewards


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees its own first warnings (the hook warns once per key and process)."""
    rollout_rewards._warned.clear()
    yield
    rollout_rewards._warned.clear()


def own_info() -> dict:
    """The keys 0.9.3 itself puts into a sample's info."""
    return {"response_length": torch.tensor([5]), "reward": torch.tensor([0.5]), "score": torch.tensor([0.5])}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (0.25, 0.25),
        (True, 1.0),
        (np.float32(0.5), 0.5),
        (np.int64(3), 3.0),
        (torch.tensor(2.0), 2.0),
        (torch.tensor([0.75]), 0.75),
        (None, None),  # what utils/agent.py leaves when the reward function raised
        (float("nan"), None),
        (float("-inf"), None),
        ("1.0", None),  # text is not a reward, even when it reads as one
        (b"1", None),
        (torch.tensor([1.0, 2.0]), None),  # not one number
        ([1.0], None),
        (10**400, None),  # overflows a float
    ],
)
def test_finite_reward(value, expected):
    assert finite_reward(value) == expected


@pytest.mark.parametrize(
    ("reward", "score", "expected"),
    [
        (0.75, 0.75, (0.75, 0.75, False)),
        (1.0, None, (1.0, 1.0, False)),  # a missing score takes the reward, as agent.py does
        (None, None, (0.0, 0.0, True)),
        (float("nan"), float("nan"), (0.0, 0.0, True)),
        (1.0, float("nan"), (1.0, 0.0, True)),  # the reward stands, the broken score is counted
        ("oops", "oops", (0.0, 0.0, True)),
    ],
)
def test_guard_rewards_in_the_rollout(reward, score, expected):
    assert guard_rewards(reward, score, ["reward_func_em.py"]) == expected


def test_reward_model_runs_keep_none():
    """Without --remote_rm_url a reward model scores the batch later: None must stay None, nothing counted."""
    assert guard_rewards(None, None, None) == (None, None, None)
    assert guard_rewards(None, None, []) == (None, None, None)


def test_extra_logs_become_numbers_text_logs_lists_and_the_rest_one_warning(caplog):
    info = own_info()
    logs = {
        "acc": 1.0,
        "ok": True,
        "i64": np.int64(7),
        "t1": torch.tensor([3.0, 9.0]),  # 0.9.3 logs a tensor's first element
        "pred": "42",  # text under a key that is not a text log: refused
        "parsed": None,
        "extracted_answer": "\\frac{1}{2}",  # a text log: kept as text, outside the tensors
        "response_length": 999.0,  # would overwrite 0.9.3's own value
    }
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three samples, one warning per key
            info = own_info()
            add_extra_logs(info, dict(logs), failed=False)
    assert info["acc"].item() == 1.0 and info["ok"].item() == 1.0 and info["i64"].item() == 7.0 and info["t1"].item() == 3.0
    assert info["extracted_answer"] == ["\\frac{1}{2}"]
    assert "pred" not in info and "parsed" not in info and info["response_length"].tolist() == [5]
    assert info["reward_failures"].tolist() == [0.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "'pred'" in m]) == 1 and "str, not a number" in next(m for m in messages if "'pred'" in m)
    assert len([m for m in messages if "'response_length' would overwrite" in m]) == 1
    assert len([m for m in messages if "'parsed'" in m]) == 1
    assert len(messages) == 3


def test_a_missing_answer_is_none_and_no_failure_flag_without_a_rollout_reward():
    info = own_info()
    add_extra_logs(info, {"extracted_answer": None}, failed=None)
    assert info["extracted_answer"] == [None] and "reward_failures" not in info
    add_extra_logs(info, None, failed=True)  # a failed reward: agent.py's extra_logs={} or None
    assert info["reward_failures"].tolist() == [1.0]


def test_align_gives_every_sample_every_key(caplog):
    """A failed reward has no extra_logs: its sample gets 0.0 for each number and None for the answer."""
    good = SimpleNamespace(info={"acc": torch.tensor([1.0]), "extracted_answer": ["7"]})
    failed = SimpleNamespace(info={})
    with caplog.at_level(logging.WARNING):
        align_info_keys([good, failed])
    assert failed.info["acc"].tolist() == [0.0] and failed.info["extracted_answer"] == [None]
    assert good.info["extracted_answer"] == ["7"]
    # one warning for the numeric key; a missing answer is the ordinary result of a failed reward
    assert [r.getMessage() for r in caplog.records] == ["info key 'acc' is missing from some samples; they log 0.0 for it"]
