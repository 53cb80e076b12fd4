"""experience_maker.patch: the real SamplesGenerator and Experience of OpenRLHF 0.9.3.

vLLM is replaced at its import boundary only (``vllm_stub`` fixture in conftest.py:
``SamplingParams`` and friends); ``_process_response_into_experience``, ``Experience`` and
the replay buffer's batch split run as shipped, pristine or patched. Responses are shaped
like those of ``utils/agent.py`` (``SingleTurnAgentExecutor.execute``), including its
``reward=None, scores=None, extra_logs={}`` when a reward function raised.
"""

from __future__ import annotations

import argparse
import types

import numpy as np
import pytest
import torch

import oprl

GENERATE_KWARGS = {"prompt_max_len": 16, "max_new_tokens": 16}


def pristine_fails(reason: str, raises: type[BaseException]):
    """The mark of a pristine case that must fail with ``raises`` (strict: an unexpected pass fails)."""
    return pytest.mark.xfail(strict=True, reason=reason, raises=raises)


def xfail_pristine(reason: str, raises: type[BaseException]) -> list:
    """("pristine", "patched"), where the pristine run must fail with ``raises``."""
    return [pytest.param("pristine", marks=pristine_fails(reason, raises)), "patched"]


def response(reward=0.5, scores="same", extra_logs=None, n_prompt: int = 4, n_action: int = 5) -> dict:
    """One rollout as SingleTurnAgentExecutor returns it."""
    tokens = list(range(10, 10 + n_prompt + n_action))
    return {
        "prompt": "What is 6 * 7?",
        "label": "42",
        "observation_tokens": tokens,
        "action_ranges": [(n_prompt, len(tokens))],
        "rollout_log_probs": None,
        "truncated": False,
        "reward": reward,
        "scores": reward if scores == "same" else scores,
        "extra_logs": {} if extra_logs is None else extra_logs,
    }


def generator(root, remote_rm_url=("reward.py",)):
    """The real SamplesGenerator of ``root``; the strategy is only read for ``.args``."""
    module = oprl.load(root, "openrlhf.trainer.ppo_utils.experience_maker")
    args = argparse.Namespace(remote_rm_url=list(remote_rm_url) if remote_rm_url else None)
    return module, module.SamplesGenerator(types.SimpleNamespace(args=args), None, None, None, [])


@pytest.fixture
def tree(request, vllm_stub):
    return request.getfixturevalue(f"{request.param}_root")


@pytest.fixture(autouse=True)
def fresh_warnings():
    """The patched tree's hook warns once per key and process: each test sees its own first warnings."""
    from rft.openrlhf import rollout_rewards

    rollout_rewards._warned.clear()


def experiences(gen, responses: list[dict]) -> list:
    return [gen._process_response_into_experience(r, **GENERATE_KWARGS) for r in responses]


@pytest.mark.parametrize("tree", ["pristine", "patched"], indirect=True)
def test_numeric_extra_logs_and_rewards_unchanged(tree):
    """Ordinary rollouts keep 0.9.3's values: reward, score and numeric extra_logs."""
    _, gen = generator(tree)
    exp = experiences(gen, [response(0.75, extra_logs={"acc": 1.0, "n_steps": 3, "ok": True})])[0]
    assert exp.rewards.tolist() == [0.75] and exp.scores.tolist() == [0.75]
    assert exp.info["reward"].tolist() == [0.75] and exp.info["score"].tolist() == [0.75]
    assert exp.info["acc"].tolist() == [1.0]
    assert exp.info["n_steps"].item() == 3 and exp.info["ok"].item() == 1
    assert exp.info["response_length"].tolist() == [5]


@pytest.mark.parametrize("tree", xfail_pristine("0.9.3 calls torch.tensor() on a string", ValueError), indirect=True)
def test_string_extra_log_is_dropped_with_one_warning(tree, caplog):
    module, gen = generator(tree)
    logs = {
        "acc": 1.0,
        "pred": "42",  # a string: not a number
        "parsed": None,
        "f32": np.float32(0.25),  # numpy scalars and 0-d tensors are numbers
        "i64": np.int64(7),
        "t0": torch.tensor(2.5),
        "t1": torch.tensor([3.0, 9.0]),  # 0.9.3 logs a tensor's first element
    }
    module.logger.addHandler(caplog.handler)  # OpenRLHF's loggers do not propagate to the root
    try:
        exps = experiences(gen, [response(extra_logs=dict(logs)), response(extra_logs=dict(logs))])
    finally:
        module.logger.removeHandler(caplog.handler)
    for exp in exps:
        assert "pred" not in exp.info and "parsed" not in exp.info
        assert exp.info["acc"].item() == 1.0 and exp.info["f32"].item() == 0.25
        assert exp.info["i64"].item() == 7.0 and exp.info["t0"].item() == 2.5 and exp.info["t1"].item() == 3.0
    warned = [r.getMessage() for r in caplog.records if "'pred'" in r.getMessage()]
    assert len(warned) == 1 and "str" in warned[0]


@pytest.mark.parametrize(
    "tree", xfail_pristine("an extra_logs key overwrites 0.9.3's own info", AssertionError), indirect=True
)
def test_extra_logs_cannot_overwrite_system_keys(tree):
    _, gen = generator(tree)
    exp = experiences(gen, [response(0.5, extra_logs={"response_length": 999.0, "reward": 7.0})])[0]
    assert exp.info["response_length"].tolist() == [5]
    assert exp.info["reward"].tolist() == [0.5]


# A broken reward, and how pristine 0.9.3 fails on it (each pristine case fails for its own reason).
BROKEN_REWARDS = [
    # the reward function raised: utils/agent.py leaves reward=None; 0.9.3 keeps rewards=None for the
    # sample, and Experience._merge_item pads [tensor, None, tensor] (None.size)
    ("None", None, "0.9.3 cannot batch a missing reward", AttributeError),
    # NaN and inf are numbers to torch.tensor(): 0.9.3 batches them into the advantages as they are
    ("nan", float("nan"), "0.9.3 passes a NaN reward on to the batch", AssertionError),
    ("inf", float("inf"), "0.9.3 passes an inf reward on to the batch", AssertionError),
    # not one number: torch.tensor([value]) raises while the sample is made
    ("oops", "oops", "0.9.3 calls torch.tensor() on a string reward", ValueError),
    ("tensor2", torch.tensor([1.0, 2.0]), "0.9.3 calls torch.tensor() on a two-element tensor", ValueError),
]


@pytest.mark.parametrize(
    ("tree", "bad"),
    [
        param
        for name, bad, reason, raises in BROKEN_REWARDS
        for param in (
            pytest.param("pristine", bad, marks=pristine_fails(reason, raises), id=f"pristine-{name}"),
            pytest.param("patched", bad, id=f"patched-{name}"),
        )
    ],
    indirect=["tree"],
)
def test_broken_reward_is_zero_and_counted(tree, bad):
    """A reward function that raised (reward=None upstream) or returned garbage: 0.0, counted, batchable."""
    module, gen = generator(tree)
    failed = dict(response(), reward=bad, scores=None if bad is None else bad, extra_logs={})
    batch = experiences(gen, [response(1.0), failed, response(0.0)])
    merged = module.Experience.concat_experiences(batch, pad_token_id=0)  # batchable first
    assert merged.rewards.tolist() == [1.0, 0.0, 0.0] and merged.scores.tolist() == [1.0, 0.0, 0.0]
    assert merged.info["reward_failures"].tolist() == [0.0, 1.0, 0.0]
    assert batch[1].info["reward"].tolist() == [0.0] and batch[1].info["score"].tolist() == [0.0]


@pytest.mark.parametrize(
    "tree", xfail_pristine("0.9.3 keeps a NaN score and counts no failure", AssertionError), indirect=True
)
def test_nan_score_with_valid_reward_counts_as_failure(tree):
    _, gen = generator(tree)
    exp = experiences(gen, [response(1.0, scores=float("nan"))])[0]
    assert exp.rewards.tolist() == [1.0]  # the reward itself is kept (pristine too)
    assert exp.scores.tolist() == [0.0]
    assert exp.info["reward_failures"].item() == 1.0


@pytest.mark.parametrize("tree", ["pristine", "patched"], indirect=True)
def test_reward_model_runs_keep_none(tree):
    """Without --remote_rm_url the reward model scores later: None must reach make_experience."""
    _, gen = generator(tree, remote_rm_url=None)
    exp = experiences(gen, [response(None, scores=None)])[0]
    assert exp.rewards is None and exp.scores is None
    assert "reward" not in exp.info and "reward_failures" not in exp.info


def generate_and_split(tree, monkeypatch, rollouts: list[dict]) -> tuple[list, list]:
    """The real _generate_vllm collects ``rollouts``; the replay buffer then splits the batch.

    The engines and ray.wait/ray.get are replaced by in-process stand-ins returning responses
    (vLLM's side of the boundary); everything in experience_maker and replay_buffer runs as shipped.
    """
    module, gen = generator(tree)
    monkeypatch.setattr(gen, "_dispatch_prompts_to_vllm", lambda prompts, labels, **kw: list(range(len(prompts))))
    monkeypatch.setattr(module.ray, "wait", lambda refs, num_returns, timeout: (refs[:1], refs[1:]))
    monkeypatch.setattr(module.ray, "get", lambda ref: [rollouts[ref]])
    prompts = iter([(None, [f"p{i}" for i in range(len(rollouts))], ["42"] * len(rollouts))])
    batch, consumed, exhausted = gen._generate_vllm(
        prompts, num_prompts=len(rollouts), dynamic_filtering=False, **GENERATE_KWARGS
    )
    assert consumed == len(rollouts) and not exhausted and len(batch) == len(rollouts)
    replay_buffer = oprl.load(tree, "openrlhf.trainer.ppo_utils.replay_buffer")
    merged = module.Experience.concat_experiences(batch, pad_token_id=0)
    return batch, replay_buffer.split_experience_batch(merged)


@pytest.mark.parametrize(
    "tree",
    # split_experience_batch: "Size of info[acc] (2) does not match batch_size (3)"
    xfail_pristine("0.9.3 batches samples with different info keys", ValueError),
    indirect=True,
)
def test_batch_carries_the_same_info_keys(tree, monkeypatch):
    """A reward function that logs a key for some samples only: every sample carries it (0.0 where absent)."""
    batch, items = generate_and_split(tree, monkeypatch, [
        response(1.0, extra_logs={"acc": 1.0}),
        response(0.5),  # extra_logs={}: no "acc" for this sample
        response(0.0, extra_logs={"acc": 0.0}),
    ])
    assert len(items) == 3
    assert len({frozenset(e.info) for e in batch}) == 1
    assert [e.info["acc"].item() for e in batch] == [1.0, 0.0, 0.0]
    assert [item.info["acc"].item() for item in items] == [1.0, 0.0, 0.0]


def test_a_failed_reward_among_string_logs_still_splits(patched_root, vllm_stub, monkeypatch):
    """Both failures at once through _generate_vllm: string extra_logs and a reward function that raised."""
    batch, items = generate_and_split(patched_root, monkeypatch, [
        response(1.0, extra_logs={"acc": 1.0, "pred": "42"}),
        response(None, scores=None),  # the reward function raised: extra_logs={}
        response(0.0, extra_logs={"acc": 0.0, "pred": "41"}),
    ])
    assert len(items) == 3 and len({frozenset(e.info) for e in batch}) == 1 and "pred" not in batch[0].info
    assert [item.info["acc"].item() for item in items] == [1.0, 0.0, 0.0]
    assert [item.info["reward_failures"].item() for item in items] == [0.0, 1.0, 0.0]
    assert [item.info["reward"].item() for item in items] == [1.0, 0.0, 0.0]
    assert [e.rewards.item() for e in batch] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "tree", xfail_pristine("0.9.3 calls torch.tensor() on the reward's extracted answer", ValueError), indirect=True
)
def test_the_rewards_extracted_answer_rides_beside_the_numbers(tree, monkeypatch):
    """reward_func_em's text log: batched as text (None where the reward failed), never a tensor."""
    batch, items = generate_and_split(tree, monkeypatch, [
        response(1.0, extra_logs={"acc": 1.0, "extracted_answer": "42"}),
        response(None, scores=None),  # the reward function raised: no extra_logs, no answer
        response(0.0, extra_logs={"acc": 0.0, "extracted_answer": None}),
    ])
    assert [e.info["extracted_answer"] for e in batch] == [["42"], [None], [None]]
    assert [item.info["extracted_answer"] for item in items] == ["42", None, None]
    assert [item.info["acc"].item() for item in items] == [1.0, 0.0, 0.0]


def test_canary_pristine_hooks():
    """The 0.9.3 lines the patch replaces; if this fails, upstream changed the rollout-to-experience
    step: remake the patch (retire it if upstream now filters extra_logs and guards None rewards)."""
    source = (oprl.SITE / "openrlhf" / "trainer" / "ppo_utils" / "experience_maker.py").read_text()
    for line in (
        '        reward_val = response.get("reward", None)\n        score_val = response.get("scores", None)\n',
        '        extra_logs = response.get("extra_logs", {})\n',
        "            info[key] = torch.tensor([value])\n",
        "            rewards=torch.tensor([reward_val]) if reward_val is not None else None,\n",
        "        return accepted_experiences, prompts_consumed, exhausted\n",
    ):
        assert line in source
