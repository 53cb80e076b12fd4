"""The generation KL on the real OpenRLHF 0.9.3 experience maker and loss, pristine and patched (CPU).

metrics_experience.patch makes every rollout ask vLLM for its sampled tokens' log-probs and
stores each sample's k3 token mean in ``make_experience``, where the engine's log-probs
(``rollout_log_probs``) meet the policy's old ones; ``compute_advantages_and_returns`` turns them
into the step's exact ``gen_kl``, ``gen_kl_seq_max`` and ``gen_kl_seq_p99``.

vLLM is the conftest stand-in at its import boundary (``vllm_stub``); Ray's object store and the
policy actors are planted (``fixtures/metrics_fakes.py``). Expected values are computed with
numpy from the planted numbers, never by ``rft.openrlhf.gen_kl``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import oprl
from fixtures import metrics_fakes as fk

PROMPT = [5, 6, 7]
N = 4  # samples per prompt


def xfail_pristine(reason: str, raises: type[BaseException]) -> list:
    """("pristine", "patched"), where the pristine run must fail with ``raises`` (strict)."""
    return [pytest.param("pristine", marks=pytest.mark.xfail(strict=True, reason=reason, raises=raises)), "patched"]


def experience_maker(root):
    return oprl.load(root, "openrlhf.trainer.ppo_utils.experience_maker")


class FakeEngine:
    """The two remote methods _dispatch_prompts_to_vllm calls; ``.remote`` returns the value itself."""

    def __init__(self):
        self.get_num_unfinished_requests = types.SimpleNamespace(remote=lambda: 0)
        self.generate_responses = types.SimpleNamespace(remote=lambda **kwargs: kwargs)


@pytest.mark.parametrize(
    ("tree", "is_correction"),
    [
        pytest.param(
            "pristine",
            False,
            marks=pytest.mark.xfail(strict=True, reason="0.9.3 asks only with the flag", raises=AssertionError),
        ),
        ("pristine", True),
        ("patched", False),
        ("patched", True),
    ],
)
def test_rollouts_ask_for_the_sampled_tokens_logprob_in_every_mode(request, vllm_stub, monkeypatch, tree, is_correction):
    em = experience_maker(request.getfixturevalue(f"{tree}_root"))
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    gen = em.SamplesGenerator.__new__(em.SamplesGenerator)
    gen.args = fk.make_args(n_samples_per_prompt=N, enable_vllm_is_correction=is_correction)
    gen.vllm_engines, gen.tokenizer = [FakeEngine(), FakeEngine()], fk.FakeTokenizer()
    requests = gen._dispatch_prompts_to_vllm(["p0", "p1", "p2"], ["1", "2", "3"], temperature=0.7, max_new_tokens=8)
    assert len(requests) == 3
    assert all(r["sampling_params"].logprobs == 1 for r in requests), [r["sampling_params"] for r in requests]
    assert requests[0]["sampling_params"].temperature == 0.7  # the rest of the request is 0.9.3's


def planted(i: int) -> tuple[list[float], list[float]]:
    """(engine, trainer) log-probs of sample ``i``'s response tokens: lengths 1 to 5, one sample with
    a large gap (the tail the max and p99 must see), one with none."""
    length = 1 + (i * 3) % 5
    engine = [-0.5 - 0.1 * j - 0.03 * i for j in range(length)]
    gap = {5: 1.5, 9: 0.0}.get(i, 0.02 * (i + 1))
    trainer = [e + gap * (-1) ** j for j, e in enumerate(engine)]
    return engine, trainer


def rollout(em, count: int):
    """Real Experience objects with the engine's log-probs, as utils/agent.py returns them (0.0 on
    prompt tokens), made by the real _process_response_into_experience."""
    gen = em.SamplesGenerator.__new__(em.SamplesGenerator)
    gen.args = fk.make_args(n_samples_per_prompt=N)
    samples = []
    for i in range(count):
        engine, _ = planted(i)
        response_ids = [10 + (i + j) % 13 for j in range(len(engine))]
        resp = fk.response_dict(PROMPT, response_ids, float(i % 2), {}, f"p{i // N}", "1")
        resp["rollout_log_probs"] = [0.0] * len(PROMPT) + engine
        samples.append(gen._process_response_into_experience(resp, prompt_max_len=16, max_new_tokens=16))
    return gen.args, samples


class FakeActorGroup:
    """The policy's forward on each micro-batch: the planted trainer log-probs at the action positions."""

    def __init__(self, batches):
        self.batches = batches

    def async_run_method_batch(self, method_name, sequences, action_mask, attention_mask):
        assert method_name == "forward"
        out = []
        for batch, mask in zip(self.batches, action_mask):
            logprobs = torch.zeros(mask.shape, dtype=torch.float32)
            for row, index in enumerate(batch.index):
                positions = torch.nonzero(mask[row]).flatten()
                logprobs[row, positions] = torch.tensor(planted(index)[1], dtype=torch.float32)
            out.append([logprobs])
        return out


def make_batch(em, args, samples):
    """split_rollout_samples, make_experience and compute_advantages_and_returns, as make_experience_batch."""
    maker = fk.experience_maker(em, args)
    maker.critic_model_group = maker.reward_model_group = maker.initial_model_group = None
    batches = maker.split_rollout_samples(samples)
    maker.actor_model_group = FakeActorGroup(batches)
    experiences = maker.make_experience(batches)
    maker.compute_advantages_and_returns(experiences)
    return maker, experiences


def expected(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample k3 token means and token counts, from the planted numbers as float32 carries them."""
    means, tokens = [], []
    for i in range(count):
        engine, trainer = (np.asarray(x, dtype=np.float32).astype(np.float64) for x in planted(i))
        d = trainer - engine
        means.append(np.mean(np.exp(d) - 1 - d))
        tokens.append(len(d))
    return np.array(means), np.array(tokens, dtype=np.float64)


@pytest.mark.parametrize("tree", xfail_pristine("0.9.3 logs no generation KL", KeyError))
def test_each_sample_carries_its_generation_kl_and_the_step_is_exact(request, vllm_stub, monkeypatch, tree):
    em = experience_maker(request.getfixturevalue(f"{tree}_root"))
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    count = 3 * N
    args, samples = rollout(em, count)
    maker, experiences = make_batch(em, args, samples)
    means, tokens = expected(count)
    per_sample = torch.cat([e.info["gen_kl"] for e in experiences]).double().numpy()
    order = np.concatenate([e.index for e in experiences])
    np.testing.assert_allclose(per_sample, means[order], rtol=1e-6)
    assert means[9] == 0.0 and means[5] > 0.5  # the planted extremes
    m = maker.batch_metrics
    assert m["gen_kl"] == pytest.approx(float((means * tokens).sum() / tokens.sum()), rel=1e-6)
    assert m["gen_kl_seq_max"] == pytest.approx(float(means.max()), rel=1e-6)
    assert m["gen_kl_seq_p99"] == pytest.approx(float(np.quantile(means, 0.99)), rel=1e-6)
    # the token mean is not the mean of sequence means (lengths differ): the weighting matters
    assert abs(m["gen_kl"] - means.mean()) > 1e-3


def test_the_step_does_not_depend_on_micro_batch_order(patched_root, vllm_stub, monkeypatch):
    """--use_dynamic_batch regroups samples by length (indices are not the identity): same values."""
    em = experience_maker(patched_root)
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    count = 2 * N
    args, samples = rollout(em, count)
    args.use_dynamic_batch, args.actor_num_nodes, args.actor_num_gpus_per_node = True, 1, 2
    args.rollout_max_tokens_per_gpu = 16
    maker, experiences = make_batch(em, args, samples)
    order = [i for e in experiences for i in e.index]
    assert len(experiences) > 1 and order != sorted(order)  # the regrouping this test is about
    means, tokens = expected(count)
    assert maker.batch_metrics["gen_kl"] == pytest.approx(float((means * tokens).sum() / tokens.sum()), rel=1e-6)
    assert maker.batch_metrics["gen_kl_seq_max"] == pytest.approx(float(means.max()), rel=1e-6)


def test_no_engine_logprobs_no_key_and_no_failure(patched_root, vllm_stub, monkeypatch):
    """A response without log-probs (a custom agent) leaves the keys out of every sample alike."""
    em = experience_maker(patched_root)
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    args, samples = rollout(em, N)
    for s in samples:
        s.rollout_log_probs = None
    maker, experiences = make_batch(em, args, samples)
    assert all("gen_kl" not in e.info for e in experiences)
    assert not any(k.startswith("gen_kl") for k in maker.batch_metrics)
    assert maker.batch_metrics["rollout_samples"] == N  # the other statistics are still there


# ------------------------------------------------------------------ the loss is unchanged

LOSSES = {
    "ppo": {},
    "ppo_dual_clip": {"dual_clip": 3.0},
    "gspo": {"policy_loss_type": "gspo"},
}


@pytest.mark.parametrize("variant", sorted(LOSSES))
def test_engine_logprobs_do_not_change_the_loss_without_is_correction(patched_root, variant):
    """Now that every experience carries rollout_log_probs, the patched PolicyLoss must give the same
    loss and gradient with them as without them unless --enable_vllm_is_correction is on."""
    cls = oprl.load(patched_root, "openrlhf.models.loss").PolicyLoss
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0
    old = -torch.rand(3, 9, generator=gen) * 3 * mask
    new = (old + torch.randn(3, 9, generator=gen) * 0.3) * mask
    engine = (old + torch.randn(3, 9, generator=gen) * 0.5) * mask
    adv = torch.randn(3, 1, generator=gen).expand(3, 9).clone()
    results = []
    for rollout_log_probs in (None, engine):
        log_probs = new.clone().requires_grad_(True)
        loss, clip, ppo_kl, vllm_kl = cls(**LOSSES[variant])(
            log_probs, old, adv, action_mask=mask, rollout_log_probs=rollout_log_probs
        )
        loss.backward()
        results.append((loss.detach(), clip, ppo_kl, vllm_kl, log_probs.grad))
    without, with_engine = results
    assert with_engine[3] is None and without[3] is None  # no vllm_kl: IS correction is off
    for a, b in zip(without[:3] + without[4:], with_engine[:3] + with_engine[4:]):
        assert torch.equal(a, b)
    with_is = cls(**LOSSES[variant], enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0])
    assert not torch.equal(with_is(new, old, adv, action_mask=mask, rollout_log_probs=engine)[0], without[0])


def test_canary_pristine_logprobs_request_and_make_experience_loop():
    """The 0.9.3 lines metrics_experience.patch hooks beside. If this fails, upstream changed how
    rollouts ask for log-probs or where make_experience meets them: remake the patch, or retire
    its generation-KL part if OpenRLHF now logs a generation-vs-training KL itself."""
    source = (oprl.SITE / "openrlhf" / "trainer" / "ppo_utils" / "experience_maker.py").read_text()
    assert "            logprobs=1 if self.args.enable_vllm_is_correction else None,\n" in source
    assert "        heapq.heapify(engine_heap)\n" in source
    assert '            samples.info["logprobs_diff"] = logprobs_diff_mean\n' in source
