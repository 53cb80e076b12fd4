"""Contract tests: reward_func_em.py used exactly the way OpenRLHF 0.9.3 uses it.

* Loaded by file path with ``importlib.util.spec_from_file_location("reward_func", path)``,
  as ``SingleTurnAgentExecutor.__init__`` does (``openrlhf/utils/agent.py``), and
  with no site-packages at all (the standard library is enough).
* Called concurrently through ``asyncio.to_thread``, as ``_fetch_rewards_via_func`` does.
* Pickled by reference and, as Ray does for code it cannot import, by value.
* Driven through OpenRLHF's real ``SingleTurnAgentExecutor.execute`` and real
  ``SamplesGenerator._process_response_into_experience``, ``Experience.concat_experiences``
  and ``split_experience_batch``, on the pristine tree and on the patched tree.
  Only vLLM is replaced: the ``vllm_stub`` fixture stands in for the ``vllm``
  import boundary, and a fake engine object returns fixed token ids where
  ``AsyncLLMEngine.generate`` would sample them. The tokenizer is a real
  ``transformers`` byte-level tokenizer with the Harmony special tokens, built in
  memory (no hub), so decoding with the special tokens kept is real.
"""

from __future__ import annotations

import asyncio
import doctest
import importlib
import importlib.util
import json
import pickle
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import oprl
import reward_func_em

REWARD_PATH = Path(__file__).resolve().parents[1] / "reward_func_em.py"
HARMONY_SPECIAL_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|constrain|>", "<|call|>"]
PROMPT = (
    "<|start|>system<|message|>You are ChatGPT.\nReasoning: medium<|end|>"
    "<|start|>user<|message|>What is 6 * 7? Reply with \\boxed{} like \\boxed{5}.<|end|><|start|>assistant"
)
# (response, label, expected reward): decoded with the special tokens kept, as 0.9.3 does
SAMPLES = [
    ("<|channel|>analysis<|message|>6*7 = 42.<|end|><|start|>assistant<|channel|>final<|message|>$\\boxed{42}$<|return|>", "42", 1.0),
    ("<|channel|>analysis<|message|>\\boxed{42}<|end|><|start|>assistant<|channel|>final<|message|>It is 41.<|return|>", "42", 0.0),
    ("<|channel|>analysis<|message|>6*7 is 42, which I will box as", "42", 0.0),
    ("<|channel|>final<|message|>\\boxed{4{,}2}<|return|>", "42", 0.0),
    ("<|channel|>final<|message|>The product is \u221242 negated, i.e. 42.<|return|>", "42", 1.0),
]


def load_like_openrlhf(path: Path = REWARD_PATH) -> types.ModuleType:
    """The three lines of ``SingleTurnAgentExecutor.__init__`` that load ``--remote_rm_url x.py``."""
    spec = importlib.util.spec_from_file_location("reward_func", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harmony_tokenizer():
    """A real byte-level fast tokenizer with Harmony's special tokens (round-trips any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_SPECIAL_TOKENS})
    return tok


class FakeEngine:
    """Stands in for vLLM's ``AsyncLLMEngine`` (the import boundary): returns fixed response ids."""

    def __init__(self, response_ids: list[int], finish_reason: str = "stop"):
        self.response_ids, self.finish_reason = response_ids, finish_reason

    async def generate(self, prompt_token_ids, sampling_params):
        out = types.SimpleNamespace(token_ids=self.response_ids, finish_reason=self.finish_reason, logprobs=None)
        return types.SimpleNamespace(outputs=[out])


def test_module_docstring_examples():
    # The examples in the module's docstrings are part of its documentation; they must stay true.
    failures, tried = doctest.testmod(reward_func_em)
    assert tried >= 10 and failures == 0


def test_loaded_by_path_returns_openrlhf_shapes():
    module = load_like_openrlhf()
    assert module.__name__ == "reward_func" and "reward_func" not in sys.modules
    response, label, reward = SAMPLES[0]
    out = module.reward_func([PROMPT + response], [PROMPT], [label])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert type(out["rewards"]) is float and out["rewards"] == reward and out["scores"] == reward
    assert tuple(out["extra_logs"]) == module.EXTRA_LOG_KEYS + module.TEXT_LOG_KEYS
    assert all(type(out["extra_logs"][k]) is float for k in module.EXTRA_LOG_KEYS)
    assert out["extra_logs"]["extracted_answer"] == "42"  # the answer it compared, as text


@pytest.mark.parametrize(
    "response",
    [response for response, _, _ in SAMPLES] + ["no answer at all", "\\boxed{", "x = 5 cm", 42, None],
)
def test_extracted_answer_is_the_one_the_eval_computes(response):
    """The samples log shows what eval_posthoc.py extracts from the same response: one parser, one answer."""
    out = reward_func_em.reward_func([PROMPT + response if isinstance(response, str) else response], [PROMPT], ["42"])
    expected = None
    if isinstance(response, str):
        expected, _ = reward_func_em.extract_answer(reward_func_em.extract_final_text(response))
    assert out["extra_logs"]["extracted_answer"] == expected
    assert reward_func_em.score_with_answer(response, "42") == (reward_func_em.score_response(response, "42"), expected)


@pytest.mark.parametrize(
    ("label", "reward"),
    [
        ("5", 1.0),
        (5, 1.0),
        (5.0, 1.0),
        # labels read from a parquet file through pandas arrive as numpy scalars
        pytest.param(np.int64(5), 1.0, id="np.int64"),
        pytest.param(np.int32(5), 1.0, id="np.int32"),
        pytest.param(np.float64(5.0), 1.0, id="np.float64"),
        pytest.param(np.float32(5.0), 1.0, id="np.float32"),
        pytest.param(np.int64(6), 0.0, id="np.int64-wrong"),
        pytest.param(np.float64("nan"), 0.0, id="np.nan"),
    ],
)
def test_numpy_scalar_labels_score_like_python_numbers(label, reward):
    out = reward_func_em.reward_func([PROMPT + "<|channel|>final<|message|>\\boxed{5}<|return|>"], [PROMPT], [label])
    assert out["rewards"] == reward
    assert out["extra_logs"]["reward_error"] == (1.0 if label != label else 0.0)  # only NaN is an unusable label


def test_a_numpy_bool_label_is_not_a_number():
    out = reward_func_em.reward_func(["\\boxed{1}"], [""], [np.bool_(True)])
    assert out["rewards"] == 0.0 and out["extra_logs"]["reward_error"] == 1.0


def test_standard_library_only(tmp_path):
    # -I -S: no site-packages, no user site, no PYTHONPATH; only the standard library can be imported.
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('reward_func', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps(m.reward_func([sys.argv[2]], [''], ['42'])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(REWARD_PATH), "\\boxed{42}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rewards"] == 1.0


def _varied_samples(n: int) -> list[tuple[str, str, str]]:
    out = []
    for i in range(n):
        response, label, _ = SAMPLES[i % len(SAMPLES)]
        out.append((PROMPT + response.replace("42", str(40 + i % 5)), PROMPT, str(40 + i % 7)))
    return out


def test_to_thread_concurrency_matches_serial():
    # 0.9.3 runs one asyncio.to_thread(reward_func, [q], [p], [lab]) per sample, many at once.
    module = load_like_openrlhf()
    samples = _varied_samples(200)
    serial = [module.reward_func([q], [p], [lab]) for q, p, lab in samples]
    before = module.reward_stats()["calls"]

    async def run_all():
        return await asyncio.gather(*(asyncio.to_thread(module.reward_func, [q], [p], [lab]) for q, p, lab in samples))

    assert asyncio.run(run_all()) == serial
    assert module.reward_stats()["calls"] == before + len(samples)
    assert {r["rewards"] for r in serial} == {0.0, 1.0}


def test_counters_are_thread_safe():
    module = load_like_openrlhf()
    start = threading.Barrier(8)

    def work(_):
        start.wait()
        for _ in range(500):
            module.reward_func(["\\boxed{1}"], [""], ["1"])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert module.reward_stats() == {"calls": 4000, "failures": 0}


def test_internal_error_is_counted_not_raised(monkeypatch):
    module = load_like_openrlhf()

    def broken(text):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "_find_last_box", broken)
    out = module.reward_func(["\\boxed{1}"], [""], ["1"])
    assert out["rewards"] == 0.0 and out["extra_logs"]["reward_error"] == 1.0
    assert module.reward_stats()["failures"] == 1
    assert module.score_response("\\boxed{1}", "1")["reward_error"] == 1.0
    assert module.extract_answer("\\boxed{1}") == (None, 0)
    assert module.reward_stats()["failures"] == 3


def test_debug_line_is_rare_and_one_line(monkeypatch, capsys):
    module = load_like_openrlhf()
    monkeypatch.setattr(module, "DEBUG_EVERY", 3)
    for _ in range(7):
        module.reward_func([PROMPT + SAMPLES[0][0]], [PROMPT], ["42"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # samples 3 and 6
    assert lines[0].startswith("[reward_func_em] sample 3 ") and "reward=1.0" in lines[0] and "label='42'" in lines[0]


def test_pickle_by_reference():
    restored = pickle.loads(pickle.dumps(reward_func_em.reward_func))
    assert restored is reward_func_em.reward_func


def test_pickle_by_value_in_a_fresh_process(tmp_path):
    # A module loaded by path is not importable elsewhere, so Ray's cloudpickle ships it by value.
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    module = load_like_openrlhf()
    blob = tmp_path / "reward.pkl"
    blob.write_bytes(cloudpickle.dumps(module.reward_func))
    code = (
        "import pickle, sys, json\n"
        "f = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "print(json.dumps(f(['\\\\boxed{1{,}000}'], [''], ['1000'])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rewards"] == 1.0


def test_stripped_form_is_what_hf_decode_produces():
    # The "analysis...assistantfinal..." form is exactly what decode(skip_special_tokens=True) leaves.
    tok = harmony_tokenizer()
    response = SAMPLES[0][0]
    ids = tok(response, add_special_tokens=False)["input_ids"]
    stripped = tok.decode(ids, skip_special_tokens=True)
    assert stripped.startswith("analysis") and "assistantfinal" in stripped
    assert reward_func_em.score_response(stripped, "42")["reward"] == 1.0
    assert reward_func_em.score_response(tok.decode(ids, skip_special_tokens=False), "42")["reward"] == 1.0


@pytest.mark.parametrize(
    "tree",
    [
        # 0.9.3 calls torch.tensor() on every extra_logs value, the extracted answer too: the
        # reward's text log needs the patched experience maker (experience_maker.patch)
        pytest.param("pristine", marks=pytest.mark.xfail(strict=True, raises=ValueError, reason="0.9.3 tensors text")),
        "patched",
    ],
)
def test_through_openrlhf_executor_and_experience_maker(tree, request, vllm_stub):
    import torch

    root = request.getfixturevalue(f"{tree}_root")
    em = oprl.load(root, "openrlhf.trainer.ppo_utils.experience_maker")
    agent = importlib.import_module("openrlhf.utils.agent")
    replay = importlib.import_module("openrlhf.trainer.ppo_utils.replay_buffer")
    assert Path(agent.__file__).resolve().is_relative_to(Path(root).resolve())

    executor = agent.SingleTurnAgentExecutor(str(REWARD_PATH))  # 0.9.3's own loader
    tok = harmony_tokenizer()
    params = vllm_stub.SamplingParams(max_tokens=256, logprobs=None)

    async def rollout():
        jobs = []
        for response, label, _ in SAMPLES:
            ids = tok(response, add_special_tokens=False)["input_ids"]
            finish = "stop" if response.endswith("<|return|>") else "length"
            jobs.append(executor.execute(PROMPT, label, params, 4096, tok, FakeEngine(ids, finish)))
        return await asyncio.gather(*jobs)

    outputs = asyncio.run(rollout())
    args = types.SimpleNamespace(remote_rm_url=[str(REWARD_PATH)], vllm_enable_sleep=False)
    generator = em.SamplesGenerator(types.SimpleNamespace(args=args), None, None, tok, [])
    experiences = [generator._process_response_into_experience(o, prompt_max_len=1024, max_new_tokens=1024) for o in outputs]

    for exp, (_, _, reward) in zip(experiences, SAMPLES, strict=True):
        for name in ("rewards", "scores"):
            tensor = getattr(exp, name)
            assert tensor.shape == (1,) and tensor.dtype == torch.float32 and tensor.item() == reward
        for key in ("reward", "score", *reward_func_em.EXTRA_LOG_KEYS):
            assert exp.info[key].shape == (1,) and exp.info[key].dtype == torch.float32, key
        assert exp.info["reward"].item() == exp.info["correctness"].item() == reward
    assert [e.info["has_final_channel"].item() for e in experiences] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [e.info["truncated_response"].item() for e in experiences] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert len({tuple(sorted(e.info)) for e in experiences}) == 1  # same keys for every sample
    # the answers the reward compared, as text beside the tensors
    assert [e.info["extracted_answer"] for e in experiences] == [["42"], ["41"], [None], ["4{,}2"], ["42"]]

    batch = em.Experience.concat_experiences(experiences, tok.pad_token_id or 0)
    for key in reward_func_em.EXTRA_LOG_KEYS:
        assert batch.info[key].shape == (len(SAMPLES),), key
    items = replay.split_experience_batch(batch)  # raises when per-sample key sets differ
    assert [item.info["correctness"].item() for item in items] == [r for _, _, r in SAMPLES]


def test_no_key_shadows_openrlhf(vllm_stub, pristine_root):
    # Keys 0.9.3 writes itself (reward, score, response_length, ...) must not be among ours.
    em = oprl.load(pristine_root, "openrlhf.trainer.ppo_utils.experience_maker")
    args = types.SimpleNamespace(remote_rm_url=None)
    generator = em.SamplesGenerator(types.SimpleNamespace(args=args), None, None, None, [])
    bare = {"observation_tokens": [1, 2, 3], "action_ranges": [(1, 3)], "rollout_log_probs": None, "prompt": "p",
            "label": "1", "truncated": False, "reward": 0.0, "scores": 0.0, "extra_logs": {}}
    own = set(generator._process_response_into_experience(bare).info)
    reserved = own | {"kl", "logprobs_diff", "group_reward_std", "return", "reward_failures", "policy_loss", "actor_lr",
                      "ppo_clip_ratio", "ppo_kl", "vllm_kl", "entropy_loss", "generated_samples"}
    assert {"reward", "score", "response_length", "total_length", "truncated"} <= own
    assert not reserved & set(reward_func_em.EXTRA_LOG_KEYS + reward_func_em.TEXT_LOG_KEYS)
    assert not set(reward_func_em.EXTRA_LOG_KEYS) & set(reward_func_em.TEXT_LOG_KEYS)


def test_bench_scores_its_samples_as_intended(capsys, monkeypatch):
    # The benchmark times real scoring: its realistic mix pays exactly the half with correct labels
    # (even samples, every kind that has a final answer), and every adversarial input gets reward 0.
    spec = importlib.util.spec_from_file_location("bench_reward", REWARD_PATH.parent / "bench" / "bench_reward.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    samples = bench.realistic_samples(40, seed=1, tokens=512)
    rewards = [reward_func_em.reward_func([q], [p], [lab])["rewards"] for q, p, lab in samples]
    assert rewards == [1.0 if i % 2 == 0 else 0.0 for i in range(40)]
    kinds = [reward_func_em.score_response(reward_func_em.strip_prompt(q, p), lab)["has_final_channel"] for q, p, lab in samples]
    assert kinds[7] == 0.0 and kinds[0] == kinds[8] == 1.0 and kinds[9] == 0.0  # truncated, Harmony, stripped, plain
    monkeypatch.setattr(reward_func_em, "DEBUG_EVERY", reward_func_em.DEBUG_EVERY)  # main() switches it off
    assert bench.main(["--samples", "20", "--tokens", "256", "--seconds", "0.05", "--repeats", "1", "--no-pin"]) == 0
    out = capsys.readouterr().out
    assert "| 20 |" in out and "| 0.500 |" in out and "worst adversarial:" in out
