"""metrics_experience.patch and metrics_actor.patch on the real OpenRLHF 0.9.3 code (CPU).

The vLLM import boundary is the conftest stand-in (``vllm_stub``); the GPU boundary is
tests/fixtures/metrics_fakes.py (planted engine, planted policy outputs). Expected values
are computed independently with numpy on the same planted numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import oprl
from fixtures import metrics_fakes as fk

EXTRA_KEYS = ("correctness", "has_answer", "has_boxed", "parse_method", "boxed_in_final", "truncated_response")


def _experience_maker(root):
    return oprl.load(root, "openrlhf.trainer.ppo_utils.experience_maker")


def planted_rollout(em, rewards, correct, parse=None, n=4, truncated=None):
    """Real Experience objects of a rollout, made by the real _process_response_into_experience."""
    args = fk.make_args(n_samples_per_prompt=n)
    gen = em.SamplesGenerator.__new__(em.SamplesGenerator)
    gen.args = args
    samples = []
    for i, (reward, ok) in enumerate(zip(rewards, correct)):
        prompt_ids = [5 + i // n, 6, 7]
        response_ids = [10 + (i * 3 + j) % 13 for j in range(2 + i % 3)]
        logs = {
            "correctness": float(ok),
            "has_answer": 1.0,
            "has_boxed": float(i % 2),
            "parse_method": float(parse[i]) if parse else 2.0,
            "boxed_in_final": 1.0,
            "truncated_response": 0.0,
        }
        trunc = bool(truncated[i]) if truncated else False
        resp = fk.response_dict(prompt_ids, response_ids, float(reward), logs, f"p{i // n}", "42", trunc)
        samples.append(gen._process_response_into_experience(resp, prompt_max_len=16, max_new_tokens=16))
    return args, samples


def run_experience_maker(em, args, samples):
    """split_rollout_samples + compute_advantages_and_returns, as make_experience_batch runs them."""
    maker = fk.experience_maker(em, args)
    batches = maker.split_rollout_samples(samples)
    for b in batches:
        b.kl = torch.zeros_like(b.action_mask, dtype=torch.float)
        b.action_log_probs = -torch.ones_like(b.action_mask, dtype=torch.float) * b.action_mask
        b.info["kl"] = torch.zeros(len(b.sequences))  # as make_experience sets without a ref model
    out = maker.compute_advantages_and_returns(batches)
    return maker, out


# ----------------------------------------------------------------- experience (patch 6)


@pytest.mark.parametrize("variant", ["pristine", "patched"])
def test_batch_metrics_on_planted_groups(request, vllm_stub, variant):
    root = request.getfixturevalue(f"{variant}_root")
    em = _experience_maker(root)
    # 4 prompts x 4 samples: rewards are correctness here (exact-match reward).
    correct = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1]
    parse = [2, 2, 1, 0] * 4
    trunc = [0, 0, 0, 1] * 4
    args, samples = planted_rollout(em, correct, correct, parse=parse, truncated=trunc)
    maker, _ = run_experience_maker(em, args, samples)
    if variant == "pristine":
        assert not hasattr(maker, "batch_metrics")
        return
    m = maker.batch_metrics
    groups = np.array(correct, dtype=float).reshape(4, 4)
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)  # prompts 0 (all 1) and 1 (all 0)
    assert m["pass_at_1"] == pytest.approx(groups.mean(1).mean())  # (1 + 0 + .25 + .75) / 4
    assert m["pass_at_1"] == pytest.approx(0.5)
    assert m["pass_at_all"] == pytest.approx(0.75)
    r = np.array(correct, dtype=float)
    assert m["reward_mean"] == pytest.approx(r.mean())
    assert m["reward_std"] == pytest.approx(r.std())
    assert m["reward_p90"] == pytest.approx(np.quantile(r, 0.9))
    assert (m["reward_min"], m["reward_max"]) == (0.0, 1.0)
    assert m["correctness"] == pytest.approx(r.mean())
    assert m["has_boxed"] == pytest.approx(0.5)
    assert m["parse_method_boxed"] == pytest.approx(0.5)
    assert m["parse_method_last_number"] == pytest.approx(0.25)
    assert m["parse_method_none"] == pytest.approx(0.25)
    assert m["truncated"] == pytest.approx(0.25)
    assert m["high_reward_but_wrong"] == 0.0  # exact-match reward: impossible
    assert m["rollout_prompts"] == 4 and m["rollout_samples"] == 16


def test_reward_and_group_stats_with_judge_like_rewards(patched_root, vllm_stub):
    em = _experience_maker(patched_root)
    rewards = [0.9, 0.9, 0.9, 0.9, 0.2, 0.7, 0.3, 0.05]
    correct = [0, 0, 1, 0, 0, 1, 0, 0]
    args, samples = planted_rollout(em, rewards, correct)
    maker, _ = run_experience_maker(em, args, samples)
    m = maker.batch_metrics
    r = np.array(rewards)
    assert m["reward_std"] == pytest.approx(r.std())
    assert m["reward_p90"] == pytest.approx(np.quantile(r, 0.9))
    # reward > 0.5 while correctness == 0: samples 0, 1, 3
    assert m["high_reward_but_wrong"] == pytest.approx(3 / 8)
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)  # prompt 0 got 0.9 four times
    assert m["pass_at_1"] == pytest.approx((0.25 + 0.25) / 2)
    assert m["pass_at_all"] == pytest.approx(1.0)


def test_prompt_hashes_reach_the_policy_actors_through_the_experience_maker(patched_root, vllm_stub):
    """metrics_actor.patch imports prompt_token_hashes from experience_maker: the hook's, not a copy."""
    from rft.openrlhf import rollout_stats

    assert _experience_maker(patched_root).prompt_token_hashes is rollout_stats.prompt_token_hashes


def test_canary_pristine_batch_metrics_hook():
    """The 0.9.3 lines metrics_experience.patch hooks after (the whole batch, in rollout order). If this
    fails, upstream changed compute_advantages_and_returns: remake the patch, or retire it if
    OpenRLHF now reports exact batch reward and group statistics."""
    source = (oprl.SITE / "openrlhf" / "trainer" / "ppo_utils" / "experience_maker.py").read_text()
    assert "        rewards = rewards.reshape(-1, args.n_samples_per_prompt)\n" in source
    assert '                experience.info["group_reward_std"] = group_reward_std\n\n        # reward shaping\n' in source


# ----------------------------------------------------------------------- actor (patch 8)
# ppo_train and training_step of the patched ActorPPOTrainer; the statistics themselves, their
# cross-rank combination and a two-rank gloo run: tests/test_hook_actor_stats.py.


def actor_trainer(pa, args, engine):
    """A real ActorPPOTrainer (patched) with the planted policy; __init__'s NCCL setup skipped."""
    from openrlhf.models import PolicyLoss

    trainer = pa.ActorPPOTrainer.__new__(pa.ActorPPOTrainer)
    trainer.strategy = fk.FakeStrategy(args)
    trainer.args = args
    trainer.actor = fk.PlantedPolicy(engine)
    trainer.ema_model = None
    trainer.actor_optim = None
    trainer.actor_scheduler = fk.FakeScheduler()
    trainer.actor_loss_fn = fk.RatioLoss(PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2))
    trainer.aux_loss = False
    trainer.max_epochs = args.max_epochs
    trainer.dataloader_pin_memory = False
    return trainer


def fill_buffer(pa, trainer, experiences, args, monkeypatch):
    from openrlhf.trainer.ppo_utils import NaiveReplayBuffer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # device index for the buffer
    trainer.replay_buffer = NaiveReplayBuffer(args.micro_train_batch_size, 0, True, False, False)
    for e in experiences:
        trainer.replay_buffer.append(e)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # no GPU: train on CPU


def expected_token_stats(experiences):
    """Advantages, entropies and log-ratios over every action token, from the planted functions."""
    adv, ent, ratio = [], [], []
    for e in experiences:
        mask = e.action_mask.bool()
        tokens = e.sequences[:, 1:]
        adv.append(e.advantages[mask].double())
        ent.append(fk.token_entropy(tokens)[:, -mask.shape[1] :][mask])
        ratio.append(fk.token_log_ratio(tokens[:, -mask.shape[1] :])[mask])
    return torch.cat(adv).numpy(), torch.cat(ent).numpy(), torch.cat(ratio).numpy()


def test_ppo_train_step_statistics(patched_root, vllm_stub, monkeypatch):
    em = _experience_maker(patched_root)
    rewards = [1, 0, 0, 1, 1, 1, 1, 0]
    args, samples = planted_rollout(em, rewards, rewards)
    _, experiences = run_experience_maker(em, args, samples)
    pa = oprl.load(patched_root, "openrlhf.trainer.ray.ppo_actor")
    # 8 samples, micro batch 2 -> 4 micro-steps; accumulation 2 -> 2 optimizer steps
    engine = fk.FakeEngine(gas=2, norms=[0.5, 80.0])
    trainer = actor_trainer(pa, args, engine)
    fill_buffer(pa, trainer, experiences, args, monkeypatch)
    status = trainer.ppo_train(kl_ctl=0.0)

    adv, ent, ratio = expected_token_stats(experiences)
    assert status["advantage_mean"] == pytest.approx(adv.mean())
    assert status["advantage_std"] == pytest.approx(adv.std())
    assert status["advantage_max"] == pytest.approx(adv.max())
    assert status["advantage_min"] == pytest.approx(adv.min())
    assert status["entropy_mean"] == pytest.approx(ent.mean())
    assert status["entropy_p10"] == pytest.approx(np.quantile(ent, 0.1))
    assert status["entropy_p90"] == pytest.approx(np.quantile(ent, 0.9))
    assert status["log_ratio_max"] == pytest.approx(ratio.max(), abs=1e-6)
    assert status["log_ratio_min"] == pytest.approx(ratio.min(), abs=1e-6)
    assert status["ratio_max"] == pytest.approx(np.exp(ratio.max()), rel=1e-5)
    assert status["grad_norm"] == pytest.approx((0.5 + 80.0) / 2)
    assert status["grad_norm_max"] == pytest.approx(80.0)
    assert status["optimizer_steps"] == 2
    assert status["lr"] == 2e-6
    details = status["optimizer_step_details"]
    assert [d["grad_norm"] for d in details] == pytest.approx([0.5, 80.0])
    # planted_rollout: prompts [5, 6, 7] and [6, 6, 7], hashed by definition (SHA-1 of int64 ids, 16 hex digits)
    hashes = {h for d in details for h in d["prompt_hashes"]}
    assert hashes == {hashlib.sha1(np.array(ids, dtype="<i8").tobytes()).hexdigest()[:16] for ids in ([5, 6, 7], [6, 6, 7])}
    # pristine keys still there, mean-reduced as before
    assert {"policy_loss", "actor_lr", "entropy_loss", "reward", "ppo_clip_ratio"} <= status.keys()


def test_micro_step_status_key_sets_identical(patched_root, vllm_stub, monkeypatch):
    """Every micro-step all-reduces the same keys (a differing set raises KeyError or hangs)."""
    em = _experience_maker(patched_root)
    args, samples = planted_rollout(em, [1, 0, 1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0])
    _, experiences = run_experience_maker(em, args, samples)
    pa = oprl.load(patched_root, "openrlhf.trainer.ray.ppo_actor")
    trainer = actor_trainer(pa, args, fk.FakeEngine(gas=3, norms=[1.0]))
    fill_buffer(pa, trainer, experiences, args, monkeypatch)
    seen = []
    reduce = trainer.strategy.all_reduce

    def record(data, op="mean"):
        seen.append(frozenset(data))
        return reduce(data, op)

    trainer.strategy.all_reduce = record
    trainer.ppo_train(kl_ctl=0.0)
    assert len(seen) == 4 and len(set(seen)) == 1
    assert not {"grad_norm", "entropy_p10", "log_ratio_max"} & set(seen[0])


def test_grad_norm_only_at_accumulation_boundaries(patched_root, vllm_stub, monkeypatch):
    em = _experience_maker(patched_root)
    args, samples = planted_rollout(em, [1, 0] * 4, [1, 0] * 4)
    _, experiences = run_experience_maker(em, args, samples)
    pa = oprl.load(patched_root, "openrlhf.trainer.ray.ppo_actor")
    engine = fk.FakeEngine(gas=8, norms=[3.0])  # no boundary within 4 micro-steps
    trainer = actor_trainer(pa, args, engine)
    fill_buffer(pa, trainer, experiences, args, monkeypatch)
    status = trainer.ppo_train(kl_ctl=0.0)
    assert status["optimizer_steps"] == 0
    assert "grad_norm" not in status  # DeepSpeed has no norm yet: nothing logged, not 0
