"""metrics_trainer.patch on the real OpenRLHF 0.9.3 trainer (CPU; vLLM boundary stubbed).

The end-to-end test drives one real BasePPOTrainer.train_step and save_logs_and_checkpoints:
real vLLM-response processing, experience making, advantages, replay buffer and the real
patched ActorPPOTrainer.ppo_train behind a stand-in for the Ray actor group (see
tests/fixtures/metrics_fakes.py for what is planted), and checks all four files. The logic
the patches call is unit-tested on its own: tests/test_hook_run_log.py (metrics_trainer.patch)
and tests/test_hook_eval_modes.py (eval_grouping.patch).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import time
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

import oprl
import reward_func_em
from fixtures import metrics_fakes as fk
from rft import metrics_schema
from rft.contract import TEXT_LOG_KEYS
from test_metrics_patches import actor_trainer, fill_buffer, planted_rollout

TRAINER = "openrlhf.trainer.ppo_trainer"


@pytest.fixture
def tr(patched_root, vllm_stub):
    return oprl.load(patched_root, TRAINER)


# ------------------------------------------------------------------------------ settings


def test_env_reaches_trainer_actor_via_runtime_env(patched_root, pristine_root, vllm_stub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METRICS_LOG_DIR", "rel/metrics")
    monkeypatch.setenv("SPIKE_GRAD_NORM", "20")
    monkeypatch.delenv("SAMPLES_LOG_DIR", raising=False)
    monkeypatch.delenv("SPIKE_LOG_PATH", raising=False)
    tr = oprl.load(patched_root, TRAINER)
    env = tr.PPOTrainer._default_options["runtime_env"]["env_vars"]
    assert env == {"METRICS_LOG_DIR": str(tmp_path / "rel/metrics"), "SPIKE_GRAD_NORM": "20"}
    pristine = oprl.load(pristine_root, TRAINER)
    assert "runtime_env" not in pristine.PPOTrainer._default_options


# -------------------------------------------------------------------------------- eval


class RecordingEngine:
    """vLLM engine actor handle: records the sample count each prompt was dispatched with."""

    def __init__(self, calls):
        self.calls = calls
        self.get_num_unfinished_requests = SimpleNamespace(remote=lambda: 0)
        self.generate_responses = SimpleNamespace(
            remote=lambda **kw: self.calls.append((kw["num_samples"], kw["sampling_params"].temperature))
        )


@pytest.mark.parametrize("variant", ["pristine", "patched"])
def test_eval_generates_eval_count(request, vllm_stub, monkeypatch, variant):
    root = request.getfixturevalue(f"{variant}_root")
    em = oprl.load(root, "openrlhf.trainer.ppo_utils.experience_maker")
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    gen = em.SamplesGenerator.__new__(em.SamplesGenerator)
    gen.args = fk.make_args(n_samples_per_prompt=8)
    calls: list[tuple[int, float]] = []
    gen.vllm_engines = [RecordingEngine(calls)]
    gen.tokenizer = fk.FakeTokenizer()
    # what PPOTrainer.fit passes for greedy eval with --eval_n_samples_per_prompt 1
    gen._dispatch_prompts_to_vllm(["p0", "p1"], ["1", "2"], temperature=0.0, n_samples_per_prompt=1)
    gen._dispatch_prompts_to_vllm(["p2"], ["3"], temperature=1.0)  # training keeps its own count
    counts = [n for n, _ in calls]
    assert counts == ([8, 8, 8] if variant == "pristine" else [1, 1, 8])
    assert [t for _, t in calls] == [0.0, 0.0, 1.0]  # the eval temperature reaches vLLM


def eval_samples(em, groups, n):
    """Eval samples (real Experience objects) for prompts with planted correctness."""
    args, _ = planted_rollout(em, [0], [0], n=1)
    gen = em.SamplesGenerator.__new__(em.SamplesGenerator)
    gen.args = args
    out = []
    for p, corrects in enumerate(groups):
        assert len(corrects) == n
        for c in corrects:
            logs = {"correctness": float(c), "has_answer": 1.0, "has_boxed": 1.0, "parse_method": 2.0}
            resp = fk.response_dict([1, 2, 3], [4, 5], float(c), logs, f"q{p}", "7")
            out.append(gen._process_response_into_experience(resp, prompt_max_len=16, max_new_tokens=16))
    return out


def run_evaluate(tr, em, samples, datasources, n, temperature):
    cls = tr.PPOTrainer.__ray_metadata__.modified_class
    fake = SimpleNamespace(
        eval_dataloader=[(datasources, [f"q{i}" for i in range(len(datasources))], ["7"] * len(datasources))],
        samples_generator=SimpleNamespace(generate_eval_samples=lambda **kw: samples),
        wandb_logger=None,
        tensorboard_logger=None,
    )
    return cls.evaluate(fake, 10, n_samples_per_prompt=n, temperature=temperature)


def test_eval_pass_at_k_on_planted_groups(tr, patched_root):
    em = sys.modules["openrlhf.trainer.ppo_utils.experience_maker"]
    groups = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]]
    samples = eval_samples(em, groups, 4)
    logs = run_evaluate(tr, em, samples, ["aime", "aime", "ood", "ood"], 4, 0.6)
    assert logs["aime/sampling_pass@1"] == pytest.approx((0.25 + 0) / 2)
    assert logs["aime/sampling_pass@4"] == pytest.approx(0.5)
    assert logs["ood/sampling_pass@1"] == pytest.approx((1 + 0.5) / 2)
    assert logs["ood/sampling_pass@4"] == pytest.approx(1.0)
    assert logs["aime/prompts"] == 2 and logs["temperature"] == 0.6
    assert not [k for k in logs if k.endswith("pass1") or k.startswith("eval_")]  # never a bare pass1


def test_greedy_eval_with_n1_during_n8_training(tr, patched_root):
    em = sys.modules["openrlhf.trainer.ppo_utils.experience_maker"]
    groups = [[1], [0], [1], [1], [0]]
    samples = eval_samples(em, groups, 1)
    logs = run_evaluate(tr, em, samples, ["probe"] * 5, 1, 0.0)
    assert logs["probe/greedy_pass@1"] == pytest.approx(0.6)
    assert logs["probe/prompts"] == 5
    assert not [k for k in logs if "pass@" in k and not k.endswith("greedy_pass@1")]
    # pristine 0.9.3 on the same eval: it would have generated 8 per prompt (see
    # test_eval_generates_eval_count) and then read every sample as its own prompt.


# ------------------------------------------------------------------------- end to end


SYNC_RESULT = {
    "sync_seconds": 0.25,
    "sync_gather_s": 0.05,
    "sync_pack_s": 0.02,
    "sync_transfer_s": 0.1,
    "sync_unpack_s": 0.01,
    "sync_apply_s": 0.03,
    "sync_delta_norm": 1.5,
    "sync_target_norm": 1.6,
    "sync_changed_frac": 0.01,
}


class ActorGroup:
    """Stand-in for the Ray actor group of policy ranks; one rank runs the real patched trainer.

    ``sync_sleep``: seconds the weight sync takes (a known duration for the trainer to measure).
    """

    def __init__(self, actor_trainer, sync_sleep: float = 0.0):
        self.trainer = actor_trainer
        self.sync_sleep = sync_sleep
        self.calls: list[str] = []

    def async_run_method_batch(self, method_name, **kwargs):
        self.calls.append(method_name)
        if method_name == "forward":  # old log-probs as PolicyModelActor.forward returns them
            return [[-1.0 * mask.float() for mask in kwargs["action_mask"]]]
        if method_name == "append":
            for experience in kwargs["experience"]:
                self.trainer.replay_buffer.append(experience)
            return [None]
        raise AssertionError(method_name)

    def async_run_method(self, method_name, **kwargs):
        self.calls.append(method_name)
        if method_name == "fit":
            status = self.trainer.ppo_train(kwargs["kl_ctl"])
            self.trainer.replay_buffer.clear()
            return [status]
        if method_name == "broadcast_to_vllm":
            time.sleep(self.sync_sleep)
            return [SYNC_RESULT]  # the weight-sync patch's dict of floats (identical on every rank)
        if method_name == "save_checkpoint":
            return [None]
        raise AssertionError(method_name)


class AnswerTokenizer(fk.FakeTokenizer):
    """FakeTokenizer, except that token 10 decodes to a boxed answer (the sample rows extract it)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\\boxed{42}" if int(t) == 10 else fk.FakeTokenizer.decode(self, [t]) for t in ids)


def with_the_rewards_text_logs(monkeypatch, tokenizer) -> None:
    """Planted rollouts also carry what the real reward_func_em returns as text logs for their responses.

    The reward runs on the decoded response, as in the vLLM engine; its extra_logs'
    ``extracted_answer`` then travels the only channel OpenRLHF gives a reward: the response dict.
    """
    planted = fk.response_dict

    def response_dict(prompt_ids, response_ids, reward, extra_logs, prompt, label, truncated=False):
        query = tokenizer.decode(response_ids)
        text_logs = {k: reward_func_em.reward_func([query], [""], [label])["extra_logs"][k] for k in TEXT_LOG_KEYS}
        return planted(prompt_ids, response_ids, reward, {**extra_logs, **text_logs}, prompt, label, truncated)

    monkeypatch.setattr(fk, "response_dict", response_dict)


def prompt_hash(ids: list[int]) -> str:
    """A prompt hash by its definition: SHA-1 of the ids as little-endian int64, first 16 hex digits."""
    return hashlib.sha1(np.array(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def trainer_modules(patched_root, monkeypatch) -> tuple[ModuleType, ModuleType, ModuleType]:
    """The patched trainer, experience-maker and ppo_actor modules, with Ray's object store planted."""
    tr = oprl.load(patched_root, TRAINER)
    em = sys.modules["openrlhf.trainer.ppo_utils.experience_maker"]
    pa = importlib.import_module("openrlhf.trainer.ray.ppo_actor")  # same tree, already on sys.path
    monkeypatch.setattr(tr, "ray", fk.fake_ray())
    monkeypatch.setattr(em, "ray", fk.fake_ray())
    return tr, em, pa


def test_one_trainer_step_end_to_end(patched_root, vllm_stub, monkeypatch, tmp_path):
    metrics, samples_dir = tmp_path / "metrics", tmp_path / "samples"
    monkeypatch.setenv("METRICS_LOG_DIR", str(metrics))
    monkeypatch.setenv("SAMPLES_LOG_DIR", str(samples_dir))
    monkeypatch.delenv("SPIKE_LOG_PATH", raising=False)
    monkeypatch.setenv("SPIKE_GRAD_NORM", "50")
    tr, em, pa = trainer_modules(patched_root, monkeypatch)

    correct = [1, 1, 1, 1, 0, 1, 0, 0]
    with_the_rewards_text_logs(monkeypatch, AnswerTokenizer())
    args, rollout = planted_rollout(em, correct, correct)
    args.save_steps = 1
    actor = actor_trainer(pa, args, fk.FakeEngine(gas=2, norms=[0.5, 80.0]))
    fill_buffer(pa, actor, [], args, monkeypatch)
    sync_sleep = 0.2
    group = ActorGroup(actor, sync_sleep=sync_sleep)
    trainer = tr.BasePPOTrainer(fk.FakeStrategy(args), group, None, None, None, [object()], AnswerTokenizer())

    started = time.monotonic()
    status, step = trainer.train_step(rollout, 0)
    step_wall = time.monotonic() - started
    # an eval step, as PPOTrainer.fit runs it before the step's logs (greedy, n=1)
    trainer.eval_dataloader = [(["probe"] * 3, ["q0", "q1", "q2"], ["7"] * 3)]
    eval_out = eval_samples(em, [[1], [0], [1]], 1)
    trainer.samples_generator = SimpleNamespace(generate_eval_samples=lambda **kw: eval_out)
    ppo_trainer_cls = tr.PPOTrainer.__ray_metadata__.modified_class
    evaluate = ppo_trainer_cls.evaluate.__get__(trainer)  # the patched method, bound as fit calls it
    trainer.run_log.run_eval(evaluate, step, {"n_samples_per_prompt": 1, "temperature": 0.0})
    trainer.save_logs_and_checkpoints(step, status, {"episode": 0})

    assert step == 1
    assert group.calls == ["forward", "append", "fit", "broadcast_to_vllm", "save_checkpoint"]
    # 1. training_metrics.jsonl
    lines = (metrics / "training_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert metrics_schema.unknown_keys(record) == []
    r = np.array(correct, dtype=float)
    assert record["global_step"] == 1 and record["episode"] == 0
    assert record["reward_mean"] == pytest.approx(r.mean()) and record["reward_std"] == pytest.approx(r.std())
    assert record["frac_reward_zero_std"] == pytest.approx(0.5)
    assert record["pass_at_1"] == pytest.approx((1 + 0.25) / 2) and record["pass_at_all"] == 1.0
    assert record["grad_norm_max"] == 80.0 and record["optimizer_steps"] == 2
    assert all(record[k] == v for k, v in SYNC_RESULT.items())
    # the sync phase took the planted sleep, within the whole step's time
    assert sync_sleep <= record["weight_sync_seconds"] <= step_wall
    assert record["training_seconds"] + record["weight_sync_seconds"] <= step_wall
    assert record["eval/probe/greedy_pass@1"] == pytest.approx(2 / 3) and record["eval/temperature"] == 0.0
    assert "parse_method" not in record and record["parse_method_boxed"] == 1.0
    for key in ("entropy_p10", "advantage_std", "log_ratio_max", "lr", "policy_loss", "training_seconds"):
        assert key in record
    # 2. learning.log
    log = (metrics / "learning.log").read_text().splitlines()
    assert len(log) == 1 and "step=1 " in log[0] and f"reward={r.mean():.3f}\u00b1{r.std():.3f}" in log[0]
    assert "eval/probe/greedy_pass@1=0.667" in log[0]
    # 3. samples_step1.jsonl
    rows = [json.loads(x) for x in (samples_dir / "samples_step1.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    # planted_rollout: sample i has prompt ids [5 + i // 4, 6, 7] and response ids
    # 10 + (3i + j) % 13 for j < 2 + i % 3; token 10 decodes to "\\boxed{42}", any other t to chr(97 + t % 26)
    assert [r["response"] for r in rows] == [
        "\\boxed{42}l", "nop", "qrst", "tu", "w\\boxed{42}l", "mnop", "pq", "stu"
    ]
    assert [r["prompt"] for r in rows] == ["p0"] * 4 + ["p1"] * 4 and {r["label"] for r in rows} == {"42"}
    assert rows[0]["correctness"] == 1.0 and rows[0]["parse_method"] == "boxed"
    # the answers the reward extracted, carried from its extra_logs (never into the actors' info)
    assert [r["extracted_answer"] for r in rows] == ["42", None, None, None, "42", None, None, None]
    assert "extracted_answer" not in record and "extracted_answer" not in status
    assert [r["prompt_hash"] for r in rows] == [prompt_hash([5, 6, 7])] * 4 + [prompt_hash([6, 6, 7])] * 4
    # 4. spike_log.jsonl: the optimizer step with grad norm 80 > 50
    spikes = [json.loads(x) for x in (metrics / "spike_log.jsonl").read_text().splitlines()]
    assert len(spikes) == 1 and spikes[0]["grad_norm"] == 80.0 and spikes[0]["global_step"] == 1
    assert spikes[0]["prompt_hashes"] and set(spikes[0]["prompts"].values()) <= {"p0", "p1"}
    assert "log_ratio_max" in spikes[0]


def test_a_failed_reward_costs_its_sample_not_the_step(patched_root, vllm_stub, monkeypatch, tmp_path):
    """The reward function raised for one sample (utils/agent.py leaves reward=None, no extra_logs)."""
    monkeypatch.setenv("METRICS_LOG_DIR", str(tmp_path))
    monkeypatch.delenv("SAMPLES_LOG_DIR", raising=False)
    tr, em, pa = trainer_modules(patched_root, monkeypatch)
    planted_args, planted_response = fk.make_args, fk.response_dict
    monkeypatch.setattr(fk, "make_args", lambda **kw: planted_args(remote_rm_url=["reward_func_em.py"], **kw))

    def response_dict(prompt_ids, response_ids, reward, extra_logs, prompt, label, truncated=False):
        if reward < 0:  # the planted failure
            return dict(planted_response(prompt_ids, response_ids, 0.0, {}, prompt, label, truncated), reward=None, scores=None)
        return planted_response(prompt_ids, response_ids, reward, extra_logs, prompt, label, truncated)

    monkeypatch.setattr(fk, "response_dict", response_dict)
    rewards = [1, 0, 1, -1, 0, 0, 1, 1]
    args, rollout = planted_rollout(em, rewards, [max(r, 0) for r in rewards])
    em.align_info_keys(rollout)  # what the patched _generate_vllm does last with the samples it collected
    actor = actor_trainer(pa, args, fk.FakeEngine(gas=2, norms=[0.5]))
    fill_buffer(pa, actor, [], args, monkeypatch)
    trainer = tr.BasePPOTrainer(fk.FakeStrategy(args), ActorGroup(actor), None, None, None, [object()], fk.FakeTokenizer())
    status, step = trainer.train_step(rollout, 0)
    trainer.save_logs_and_checkpoints(step, status, {"episode": 0})
    record = json.loads((tmp_path / "training_metrics.jsonl").read_text())
    assert step == 1 and record["global_step"] == 1 and record["optimizer_steps"] == 2
    assert record["reward_failures_count"] == 1 and record["reward_failures"] == 1 / 8
    assert record["reward_mean"] == pytest.approx(4 / 8)  # the failed sample counts as 0.0


class FakePromptLoader:
    """The prompt dataloader's surface used by PPOTrainer.fit."""

    def __len__(self):
        return 2

    def state_dict(self):
        return {"consumed": 2}


def test_fit_evaluates_before_writing_the_step_record(patched_root, vllm_stub, monkeypatch, tmp_path):
    """PPOTrainer.fit: generation is timed, eval lands in the same step's record, checkpoint after eval."""
    monkeypatch.setenv("METRICS_LOG_DIR", str(tmp_path))
    monkeypatch.delenv("SAMPLES_LOG_DIR", raising=False)
    tr, em, pa = trainer_modules(patched_root, monkeypatch)
    correct = [1, 0, 1, 1, 0, 0, 0, 0]
    args, rollout = planted_rollout(em, correct, correct)
    args.num_episodes, args.eval_steps, args.save_steps = 1, 1, 1
    args.eval_temperature, args.eval_n_samples_per_prompt = 0.0, 1
    actor = actor_trainer(pa, args, fk.FakeEngine(gas=2, norms=[0.4]))
    fill_buffer(pa, actor, [], args, monkeypatch)
    group = ActorGroup(actor)
    order: list[str] = []
    batches = iter([(rollout, None, 2, False), ([], None, 0, True)])
    generation_sleep, eval_sleep = 0.2, 0.3  # known durations of the two phases fit times (each call)

    def generate_samples(**kw):
        order.append("generate")
        time.sleep(generation_sleep)
        return next(batches)

    def generate_eval_samples(**kw):
        order.append(f"eval n={kw['n_samples_per_prompt']} T={kw['temperature']}")
        time.sleep(eval_sleep)
        return eval_samples(em, [[1], [1], [0], [1]], 1)

    cls = tr.PPOTrainer.__ray_metadata__.modified_class
    trainer = cls.__new__(cls)
    tr.BasePPOTrainer.__init__(trainer, fk.FakeStrategy(args), group, None, None, None, [object()], fk.FakeTokenizer())
    trainer.prompts_dataloader = FakePromptLoader()
    trainer.eval_dataloader = [(["ood"] * 4, ["q0", "q1", "q2", "q3"], ["7"] * 4)]
    trainer.samples_generator = SimpleNamespace(generate_samples=generate_samples, generate_eval_samples=generate_eval_samples)
    trainer.generate_kwargs = {"temperature": 1.0}
    group.calls = order  # one timeline of generation, actor-group calls and eval

    started = time.monotonic()
    trainer.fit()
    fit_wall = time.monotonic() - started

    assert order == ["generate", "forward", "append", "fit", "broadcast_to_vllm", "eval n=1 T=0.0", "save_checkpoint", "generate"]
    record = json.loads((tmp_path / "training_metrics.jsonl").read_text())
    assert record["eval/ood/greedy_pass@1"] == 0.75 and record["global_step"] == 1
    # each phase took its sleep and none of the others: fit's wall time holds the eval's sleep and
    # two generations' (the second finds the prompts exhausted)
    assert eval_sleep <= record["eval/seconds"] <= fit_wall - 2 * generation_sleep
    assert generation_sleep <= record["generation_seconds"] <= fit_wall - generation_sleep - eval_sleep
    assert metrics_schema.unknown_keys(record) == []


def test_canary_pristine_eval_and_trainer_hooks():
    """The 0.9.3 lines eval_grouping.patch and metrics_trainer.patch change. If this fails, upstream
    changed them: remake the patches; retire eval_grouping when generation honours the eval count,
    metrics_trainer when OpenRLHF writes a per-step metrics file itself."""
    ppo_utils = oprl.SITE / "openrlhf" / "trainer" / "ppo_utils"
    maker = (ppo_utils / "experience_maker.py").read_text()
    assert maker.count("                num_samples=self.args.n_samples_per_prompt,\n") == 1  # the eval bug
    trainer = (oprl.SITE / "openrlhf" / "trainer" / "ppo_trainer.py").read_text()
    for line in (
        '        rewards = torch.tensor(rewards_list).reshape(-1, n_samples_per_prompt)\n',  # groups by the eval count
        '        ray.get(self.actor_model_group.async_run_method(method_name="broadcast_to_vllm"))\n',
        "        experiences = self.experience_maker.make_experience_batch(rollout_samples)\n",
        "                self.save_logs_and_checkpoints(global_step, status, client_states)\n\n"
        "                # TODO: Add evaluation mechanism for PPO\n",  # eval runs after the step's logs
        "@ray.remote\nclass PPOTrainer(BasePPOTrainer):\n",
    ):
        assert line in trainer, line
