"""End-to-end checks of eval_posthoc.py on CPU with a tiny model built here (no hub).

The tiny model is a real 1-layer LlamaForCausalLM whose weights are set by hand so
that its greedy answers are known in advance:

* attention and MLP outputs are zeroed, so the next token depends only on the
  current one, and ``lm_head`` is a transition table between tokens;
* the base model answers ``\\boxed{ 7 }`` to every prompt; a LoRA adapter on
  ``lm_head`` (made with peft) makes the merged model answer ``\\boxed{ 3 }``.

With labels 3, 3, 3, 7, 5 the base scores 1/5 and the adapter 3/5 in
greedy_pass@1, the adapter gains 3 problems and loses 1, and McNemar's exact
p-value is 2 * P(X <= 1 | X ~ Bin(4, 1/2)) = 0.625. The sampling modes are
checked by recomputing every metric from the JSONL with brute force.

``reward_func_em`` (the training reward) scores everything; nothing is stubbed
except, in the vLLM test, the ``vllm`` import boundary (the ``vllm_stub`` fixture
with a stand-in ``LLM`` that runs the same tiny model through transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import eval_posthoc  # noqa: E402
from rft.eval_io import EvalInputError, SampleStore  # noqa: E402
from rft.prompt_spec import PromptSpec  # noqa: E402


@pytest.fixture
def em():
    """The training reward module (top-level reward_func_em.py)."""
    return pytest.importorskip("reward_func_em")

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = [str(d) for d in range(10)] + ["\\boxed{", "}", "what", "is", "plus", "?", "compute"]
VOCAB = SPECIALS + WORDS
TOK = {t: i for i, t in enumerate(VOCAB)}
HIDDEN = 32
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if reasoning_effort is defined %}effort {{ reasoning_effort }} {% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LABELS = ["3", "3", "3", "7", "5"]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=TOK, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", additional_special_tokens=SPECIALS[3:]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_base_model(path: Path) -> Path:
    """Save the tiny base model and its tokenizer: greedy answers ``\\boxed{ 7 } <eos>``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=TOK["<pad>"], eos_token_id=TOK["<eos>"], bos_token_id=None, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(VOCAB), HIDDEN))  # token t -> unit vector e_t
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        w = model.lm_head.weight
        w.zero_()
        # Transitions: prompt end -> \boxed{ -> 7 -> } -> <eos>; also 3 -> } for the adapter.
        # After \boxed{ the 7 wins only mildly, so sampling at T=0.6 spreads over other tokens.
        w[TOK["\\boxed{"], TOK["<|assistant|>"]] = 1.0
        w[TOK["7"], TOK["\\boxed{"]] = 0.25
        w[TOK["}"], TOK["7"]] = 1.0
        w[TOK["}"], TOK["3"]] = 1.0
        w[TOK["<eos>"], TOK["}"]] = 1.0
    model.generation_config.eos_token_id = TOK["<eos>"]
    model.generation_config.pad_token_id = TOK["<pad>"]
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def make_adapter(base: Path, path: Path, strength: float) -> Path:
    """A LoRA adapter on q/v/lm_head; on lm_head it adds ``strength`` to the \\boxed{ -> 3 transition."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        head = pm.base_model.model.lm_head
        head.lora_A["default"].weight.zero_()
        head.lora_A["default"].weight[0, TOK["\\boxed{"]] = 1.0
        head.lora_B["default"].weight.zero_()
        head.lora_B["default"].weight[TOK["3"], 0] = strength
    pm.save_pretrained(path, save_embedding_layers=False)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = make_base_model(root / "base")
    adapter = make_adapter(base, root / "adapter", strength=0.5)
    data = root / "probs.jsonl"
    inputs = ["what is 1 plus 2 ?", "compute 1 plus 2", "what is 2 plus 1 ?", "what is 3 plus 4 ?", "compute 2 plus 3"]
    data.write_text("".join(json.dumps({"input": i, "label": lab}) + "\n" for i, lab in zip(inputs, LABELS)))
    return {"root": root, "base": base, "adapter": adapter, "data": data}


def base_args(tiny, out: Path, merged: Path, *extra: str) -> list[str]:
    return [
        "--backend", "hf", "--base", str(tiny["base"]),
        "--model", f"base={tiny['base']}", "--adapter", f"a={tiny['adapter']}", "--baseline", "base",
        "--dataset", f"probs={tiny['data']}", "--max-tokens", "6",
        "--output-dir", str(out), "--merged-dir", str(merged), "--merge-dtype", "float32",
        "--bootstrap-resamples", "500", *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def result(summary: dict, model: str, mode: str) -> dict:
    (r,) = [r for r in summary["results"] if r["model"] == model and r["mode"] == mode]
    return r


def test_prompt_is_the_one_openrlhf_builds(tiny):
    """As the patched PromptDataset builds it: 0.9.3's preprocess_data with the prompt-spec hook."""
    from openrlhf.datasets.prompts_dataset import preprocess_data

    from rft.openrlhf.prompt import chat_template_fn
    from rft.prompt_spec import DEFAULT_DATE, PromptSpec

    tok = transformers.AutoTokenizer.from_pretrained(tiny["base"])
    row = {"input": "what is 1 plus 2 ?", "label": "3"}
    run_args = argparse.Namespace(reasoning_effort="medium", prompt_date=DEFAULT_DATE)
    theirs, label = preprocess_data(row, input_key="input", label_key="label",
                                    apply_chat_template=chat_template_fn(tok, run_args))
    spec = PromptSpec.for_tokenizer(tok)
    assert eval_posthoc.build_prompt(tok, row["input"], spec) == theirs
    assert label == "3"
    # Token ids as OpenRLHF's agent tokenizes the prompt (no extra special tokens).
    ids, cut = eval_posthoc.prompt_token_ids(tok, theirs)
    assert ids == tok(theirs, add_special_tokens=False)["input_ids"] and not cut
    assert ids[-1] == TOK["<|assistant|>"]
    # Reasoning effort reaches the template only when asked for; prompt cut keeps the tail.
    assert "effort high" in eval_posthoc.build_prompt(tok, row["input"], PromptSpec.for_tokenizer(tok, "high"))
    assert "effort medium" in theirs
    tail, cut = eval_posthoc.prompt_token_ids(tok, theirs, prompt_max_len=3)
    assert cut and tail == ids[-3:]


def test_modes_are_labelled_and_checked():
    assert eval_posthoc.parse_mode("greedy_pass@1") == eval_posthoc.Mode("greedy_pass@1", 0.0, 1, 1.0)
    assert eval_posthoc.parse_mode("sampling_pass@8") == eval_posthoc.Mode("sampling_pass@8", 0.6, 8, 1.0)
    assert eval_posthoc.parse_mode("nondet_proxy_pass@8") == eval_posthoc.Mode("nondet_proxy_pass@8", 0.0, 8, 1.0)
    assert eval_posthoc.parse_mode("sampling_pass@4", 1.0).name == "sampling_t1_pass@4"
    for bad in ("greedy_pass@8", "pass@1", "sampling_pass@0"):
        with pytest.raises(EvalInputError):
            eval_posthoc.parse_mode(bad)


@pytest.mark.slow
def test_adapter_to_summary_end_to_end(tiny, tmp_path, em):
    out, merged = tmp_path / "out", tmp_path / "merged"
    modes = "greedy_pass@1,sampling_pass@4,nondet_proxy_pass@2"
    summary = eval_posthoc.run(base_args(tiny, out, merged, "--modes", modes))

    # Planted greedy answers: base says 7, the merged adapter says 3.
    g_base, g_a = result(summary, "base", "greedy_pass@1"), result(summary, "a", "greedy_pass@1")
    assert g_base["pass@1"] == pytest.approx(1 / 5) and g_a["pass@1"] == pytest.approx(3 / 5)
    assert g_a["has_boxed_rate"] == 1.0 and g_a["truncation_rate"] == 0.0
    assert g_a["mean_response_tokens"] == 4.0  # \boxed{ 3 } <eos>
    samples = read_jsonl(out / g_a["samples_file"])
    assert [s["response"] for s in samples] == ["\\boxed{ 3 } <eos>"] * 5
    assert all(s["finish_reason"] == "stop" and s["seed"] is None for s in samples)
    (cmp_greedy,) = [c for c in summary["comparisons"] if c["mode"] == "greedy_pass@1"]
    assert (cmp_greedy["gained"], cmp_greedy["lost"], cmp_greedy["neither"]) == (3, 1, 1)
    assert cmp_greedy["mcnemar_p_exact"] == pytest.approx(0.625)
    assert cmp_greedy["mcnemar_p_midp"] == pytest.approx(0.375)
    assert cmp_greedy["delta_pass@1"] == pytest.approx(0.4)

    # nondet_proxy with the deterministic hf backend: 2 identical greedy samples each.
    nd = result(summary, "a", "nondet_proxy_pass@2")
    assert nd["pass@1"] == pytest.approx(3 / 5) and nd["pass@k"]["2"] == pytest.approx(3 / 5)

    # Every reported number is recomputed from the JSONL: scores by reward_func_em, pass@k by
    # enumeration of k-subsets, maj@n by counting votes, rates and lengths by hand.
    tok = transformers.AutoTokenizer.from_pretrained(tiny["base"])
    for r in summary["results"]:
        recs = read_jsonl(out / r["samples_file"])
        n = r["n_samples"]
        assert {(x["problem"], x["sample"]) for x in recs} == {(i, j) for i in range(5) for j in range(n)}
        assert all(x["model"] == r["model"] and x["dataset"] == "probs" and x["mode"] == r["mode"] for x in recs)
        by_problem = {}
        for x in recs:
            assert x["label"] == LABELS[x["problem"]]
            prompt = eval_posthoc.build_prompt(tok, json.loads(tiny["data"].read_text().splitlines()[x["problem"]])["input"],
                                               PromptSpec.for_tokenizer(tok))
            assert x["prompt_spec"] == PromptSpec.for_tokenizer(tok).digest()
            assert x["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()[:16]
            s = em.score_response(x["response"], x["label"])
            assert x["correct"] == (s["correctness"] == 1.0)
            by_problem.setdefault(x["problem"], []).append(x)
        for k in range(1, n + 1):
            brute = []
            for xs in by_problem.values():
                subsets = list(itertools.combinations(xs, k))
                brute.append(sum(any(s["correct"] for s in sub) for sub in subsets) / len(subsets))
            assert r["pass@k"][str(k)] == pytest.approx(sum(brute) / 5)
        assert r["pass@1"] == pytest.approx(sum(x["correct"] for x in recs) / len(recs))
        lo, hi = r["pass@1_ci95"]
        assert lo <= r["pass@1"] <= hi
        assert r["has_boxed_rate"] == pytest.approx(sum(em.score_response(x["response"], x["label"])["has_boxed"] for x in recs) / len(recs))
        assert r["truncation_rate"] == pytest.approx(sum(x["finish_reason"] == "length" for x in recs) / len(recs))
        assert r["mean_response_tokens"] == pytest.approx(sum(x["response_tokens"] for x in recs) / len(recs))
        for x in recs:
            if x["finish_reason"] == "length":
                assert x["response_tokens"] == 6
        if n > 1:
            maj = 0.0
            for xs in by_problem.values():
                votes = {}
                for x in xs:
                    if x["pred_norm"] is not None:
                        votes.setdefault(x["pred_norm"], []).append(x["correct"])
                if votes:
                    top = max(len(v) for v in votes.values())
                    tied = [v for v in votes.values() if len(v) == top]
                    maj += sum(all(v) for v in tied) / len(tied)
            assert r[f"maj@{n}"] == pytest.approx(maj / 5)

    # Sampling really samples (seeded per sample), and the summary files are all there.
    sampled = read_jsonl(out / result(summary, "base", "sampling_pass@4")["samples_file"])
    assert len({x["response"] for x in sampled}) > 1 and all(isinstance(x["seed"], int) for x in sampled)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(summary["results"]))
    table = (out / "summary.md").read_text()
    data_sha = hashlib.sha256(tiny["data"].read_bytes()).hexdigest()
    digest = PromptSpec.for_tokenizer(tok).digest()
    row = f"| a | probs ({data_sha[:12]}) | greedy_pass@1 | 0 | 1 | 1 | medium | "
    assert row in table and f" | {digest} | 5/5 | 60.0% [" in table.split(row, 1)[1].splitlines()[0]
    for r in summary["results"]:  # every number says how it was made
        n = r["n_samples"]
        assert (r["dataset_sha256"], r["reasoning_effort"], r["prompt_spec"]) == (data_sha, "medium", digest)
        assert r["k"] == list(range(1, n + 1)) and r[f"avg@{n}"] == pytest.approx(r["pass@1"])
        assert r["truncation_rate"] is not None and r["differs_from_run"] == []
    assert "| a vs base | probs | greedy_pass@1 | 5 | +40.0 pts" in table
    assert (out / "summary.png").stat().st_size > 1000


def test_merge_is_exact_cached_and_invalidated(tiny, tmp_path):
    merged_root = tmp_path / "merged"
    adapter = tmp_path / "adapter"
    make_adapter(tiny["base"], adapter, strength=0.5)
    path, ran = eval_posthoc.merge_adapter("a", adapter, str(tiny["base"]), merged_root, dtype="float32")
    assert ran and path == merged_root / "a"

    # The merged weights give the same logits as base + adapter through peft.
    ids = torch.tensor([[TOK["<|user|>"], TOK["what"], TOK["<|assistant|>"], TOK["\\boxed{"]]])
    base_model = transformers.AutoModelForCausalLM.from_pretrained(tiny["base"])
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(base_model, adapter)(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits
    assert torch.allclose(want, got, atol=1e-6)
    assert int(got[0, -1].argmax()) == TOK["3"]

    # Unchanged adapter: reused, not rewritten.
    record = (path / "rft_merge.json").read_text()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    path2, ran2 = eval_posthoc.merge_adapter("a", adapter, str(tiny["base"]), merged_root, dtype="float32")
    assert path2 == path and not ran2
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime and (path / "rft_merge.json").read_text() == record

    # Changed adapter (new weights): merged again, and the new model answers 7 again.
    make_adapter(tiny["base"], adapter, strength=0.0)
    path3, ran3 = eval_posthoc.merge_adapter("a", adapter, str(tiny["base"]), merged_root, dtype="float32")
    assert path3 == path and ran3
    assert (path / "rft_merge.json").read_text() != record
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits
    assert int(logits[0, -1].argmax()) == TOK["7"]
    assert sorted(p.name for p in merged_root.iterdir()) == ["a"]  # no temporary directories left

    # A directory the tool did not make is never overwritten.
    (merged_root / "b").mkdir()
    with pytest.raises(EvalInputError, match="not made by eval_posthoc"):
        eval_posthoc.merge_adapter("b", adapter, str(tiny["base"]), merged_root, dtype="float32")


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interruption_loses_nothing(tiny, tmp_path, em):
    from rft.eval_backends import HFBackend

    common = ["--modes", "sampling_pass@4", "--batch-size", "4"]
    ref_out = tmp_path / "ref"
    eval_posthoc.run(base_args(tiny, ref_out, tmp_path / "merged", *common))

    calls = {"n": 0}

    def failing_factory(path, tok_path, tok):
        backend = HFBackend(path, tok, batch_size=4)
        real = backend.generate

        def generate(requests):
            calls["n"] += 1
            if calls["n"] == 3:  # the third chunk never finishes
                raise Interrupt()
            return real(requests)

        backend.generate = generate
        return backend

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        eval_posthoc.run(base_args(tiny, out, tmp_path / "merged", *common), backend_factory=failing_factory)
    base_file = out / "samples" / "base" / "probs" / "sampling_pass@4.jsonl"
    assert len(read_jsonl(base_file)) == 8  # two chunks of 4 were written before the failure
    # A crash in the middle of a write leaves a cut line: it is dropped, not trusted.
    with base_file.open("a") as f:
        f.write('{"model": "base", "problem": 2, "sam')

    generated = []

    def counting_factory(path, tok_path, tok):
        backend = HFBackend(path, tok, batch_size=4)
        real = backend.generate

        def generate(requests):
            generated.extend(requests)
            return real(requests)

        backend.generate = generate
        return backend

    summary = eval_posthoc.run(base_args(tiny, out, tmp_path / "merged", *common), backend_factory=counting_factory)
    assert len(generated) == 2 * 20 - 8  # only the missing samples: 12 of base, 20 of the adapter
    ref = json.loads((ref_out / "summary.json").read_text())
    for model in ("base", "a"):
        f = out / "samples" / model / "probs" / "sampling_pass@4.jsonl"
        recs = read_jsonl(f)
        keys = [(x["problem"], x["sample"]) for x in recs]
        assert sorted(keys) == [(i, j) for i in range(5) for j in range(4)]  # each sample exactly once
        ref_recs = {(x["problem"], x["sample"]): x for x in read_jsonl(ref_out / "samples" / model / "probs" / "sampling_pass@4.jsonl")}
        assert all(x["response"] == ref_recs[(x["problem"], x["sample"])]["response"] for x in recs)
        assert result(summary, model, "sampling_pass@4")["pass@k"] == result(ref, model, "sampling_pass@4")["pass@k"]

    # A third run has nothing to generate.
    generated.clear()
    eval_posthoc.run(base_args(tiny, out, tmp_path / "merged", *common), backend_factory=counting_factory)
    assert generated == []


def test_changed_settings_are_refused_not_mixed(tiny, tmp_path, em):
    out, merged = tmp_path / "out", tmp_path / "merged"
    eval_posthoc.run(base_args(tiny, out, merged))
    with pytest.raises(EvalInputError, match="written with other settings"):
        eval_posthoc.run(base_args(tiny, out, merged) + ["--max-tokens", "5"])
    # --summary-only generates nothing and reports the same numbers.
    def no_generation(*args):
        raise AssertionError("--summary-only must not start a backend")

    first = json.loads((out / "summary.json").read_text())
    again = eval_posthoc.run(base_args(tiny, out, merged) + ["--summary-only"], backend_factory=no_generation)
    assert again["results"] == first["results"] and again["comparisons"] == first["comparisons"]
    store = SampleStore(out / "samples" / "a" / "probs" / "greedy_pass@1.jsonl", key="other")
    with pytest.raises(EvalInputError, match="use another --output-dir"):
        store.load()


@pytest.mark.slow
def test_vllm_path_shares_everything_but_generation(tiny, tmp_path, vllm_stub, em):
    """vLLM is stubbed at its import boundary: a stand-in LLM runs the tiny model with transformers."""
    seen = {"init": [], "params": []}

    class Completion:
        def __init__(self, ids, reason):
            self.token_ids, self.finish_reason = ids, reason

    class FakeLLM:
        def __init__(self, model, **kwargs):
            seen["init"].append({"model": model, **kwargs})
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model).eval()

        def generate(self, prompts, params, use_tqdm=True):
            outs = []
            for prompt, p in zip(prompts, params):
                seen["params"].append(p)
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.no_grad():
                    seq = self.model.generate(ids, max_new_tokens=p.max_tokens, do_sample=False, eos_token_id=TOK["<eos>"], pad_token_id=0)
                new = seq[0, ids.shape[1]:].tolist()
                reason = "stop" if new and new[-1] == TOK["<eos>"] else "length"
                outs.append(type("Out", (), {"outputs": [Completion(new, reason)]})())
            return outs

    vllm_stub.LLM = FakeLLM
    args = [a for a in base_args(tiny, tmp_path / "out", tmp_path / "merged") if a not in ("--backend", "hf")]
    summary = eval_posthoc.run(args + ["--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.5", "--modes", "greedy_pass@1,sampling_pass@2"])
    assert result(summary, "a", "greedy_pass@1")["pass@1"] == pytest.approx(3 / 5)
    assert result(summary, "base", "greedy_pass@1")["pass@1"] == pytest.approx(1 / 5)
    assert summary["backend"] == "vllm"
    assert {i["tensor_parallel_size"] for i in seen["init"]} == {1} and {i["gpu_memory_utilization"] for i in seen["init"]} == {0.5}
    greedy = [p for p in seen["params"] if p.temperature == 0]
    sampled = [p for p in seen["params"] if p.temperature > 0]
    assert len(greedy) == 10 and len(sampled) == 20
    assert all(p.n == 1 and p.skip_special_tokens is False and p.max_tokens == 6 and p.min_tokens == 1 for p in seen["params"])
    assert all(p.seed is None for p in greedy) and len({p.seed for p in sampled}) == 10  # per sample, same for both models
    assert all(p.temperature == 0.6 and p.top_k == -1 for p in sampled)


def test_bad_dataset_gives_one_line_error(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "what is 1 plus 2 ?", "label": "3"}\n{"question": "x", "label": "1"}\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval_posthoc.py"), "--backend", "hf", "--model", f"m={tiny['base']}", "--dataset", str(bad),
         "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2: no 'input' key" in err[0] and "--input-key" in err[0]
    assert not (tmp_path / "o").exists()


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "eval_posthoc.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--adapter", "--baseline", "--modes", "--tensor-parallel-size", "--merged-dir", "sampling_pass@N"):
        assert flag in proc.stdout


def test_sample_store_keeps_finished_lines_and_drops_a_cut_one(tmp_path):
    path = tmp_path / "s.jsonl"
    store = SampleStore(path, key="k1")
    store.append([{"problem": 0, "sample": 0, "x": 1}, {"problem": 0, "sample": 1, "x": 2}])
    # A whole record whose newline never made it to disk is kept ...
    with path.open("a") as f:
        f.write(json.dumps({"problem": 1, "sample": 0, "x": 3, "run_key": "k1"}))
    assert sorted(store.load()) == [(0, 0), (0, 1), (1, 0)]
    # ... a cut record is removed from the file, and the lines before it stay.
    with path.open("a") as f:
        f.write('{"problem": 1, "sample": 1, "x"')
    assert sorted(store.load()) == [(0, 0), (0, 1), (1, 0)]
    assert path.read_text().endswith('"run_key": "k1"}\n')
    # Damage in the middle is an error naming the line, and nothing is removed.
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "{oops", *text[1:]]) + "\n")
    before = path.read_bytes()
    with pytest.raises(EvalInputError, match=r"s.jsonl:2: damaged record"):
        store.load()
    assert path.read_bytes() == before


def test_a_failing_scorer_costs_one_sample_not_the_run():
    class Broken:
        def score_response(self, response, label):
            raise RuntimeError("boom")

    out = eval_posthoc.score_sample(Broken(), "\\boxed{3}", "3")
    assert out["correct"] is False and out["score_error"] == "RuntimeError: boom" and out["pred_norm"] is None


def test_score_sample_uses_the_training_extraction(em):
    # Harmony: only the final channel counts; the vote key is the normalized answer.
    resp = "<|channel|>analysis<|message|>maybe \\boxed{41}<|end|><|start|>assistant<|channel|>final<|message|>So $\\boxed{1{,}024}$.<|return|>"
    out = eval_posthoc.score_sample(em, resp, "1024")
    assert out["correct"] is True and out["pred_norm"] == "1024" and out["score"]["has_final_channel"] == 1.0
    cut = eval_posthoc.score_sample(em, "<|channel|>analysis<|message|>so \\boxed{1024}", "1024")
    assert cut["correct"] is False and cut["pred_norm"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "d.jsonl"], "nothing to evaluate"),
        (["--adapter", "a=/nonexistent", "--dataset", "d.jsonl"], "needs --base"),
        (["--adapter", "a=/nonexistent", "--base", "b", "--dataset", "d.jsonl"], "is not a directory"),
        (["--model", "m=x", "--model", "m=y", "--dataset", "d.jsonl"], "repeated: m"),
        (["--model", "m=x", "--baseline", "z", "--dataset", "d.jsonl"], "--baseline z: not among the models (m)"),
        (["--model", "bad name=x", "--dataset", "d.jsonl"], "must be letters"),
        (["--model", "m=x", "--modes", "greedy_pass@1,greedy_pass@1", "--dataset", "d.jsonl"], "listed twice"),
        (["--model", "m=x"], "no --dataset"),
        (["--model", "m=x", "--dataset", "/nonexistent.jsonl"], "dataset file not found"),
    ],
)
def test_bad_command_lines_are_named(argv, message):
    with pytest.raises(EvalInputError, match=re.escape(message)):
        eval_posthoc.run(argv)


@pytest.mark.slow
def test_cli_adapter_to_summary_in_a_subprocess(tiny, tmp_path):
    """The documented CPU command, as a user types it: adapter + base, hf backend, one dataset."""
    out, merged = tmp_path / "out", tmp_path / "merged"
    cmd = [
        sys.executable, str(ROOT / "eval_posthoc.py"), "--adapter", f"a={tiny['adapter']}", "--base", str(tiny["base"]),
        "--backend", "hf", "--dataset", str(tiny["data"]), "--max-tokens", "6", "--merge-dtype", "float32",
        "--merged-dir", str(merged), "--output-dir", str(out), "--bootstrap-resamples", "200",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    (r,) = summary["results"]
    assert (r["model"], r["dataset"], r["mode"]) == ("a", "probs", "greedy_pass@1")
    assert r["pass@1"] == pytest.approx(3 / 5) and r["n_problems"] == 5
    assert re.search(r"\| a \| probs \([0-9a-f]{12}\) \| greedy_pass@1 \| 0 \| 1 \| 1 \| medium \| 6 \| [0-9a-f]{16} "
                     r"\| 5/5 \| 60\.0% \[", proc.stdout), proc.stdout[-2000:]
    assert (merged / "a" / "rft_merge.json").is_file()


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("eval_posthoc.py: error:")
    return lines[0]


def test_unwritable_dirs_and_unloadable_base_are_one_line(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    common = [sys.executable, str(ROOT / "eval_posthoc.py"), "--backend", "hf", "--dataset", str(tiny["data"])]
    adapter = ["--adapter", f"a={tiny['adapter']}"]

    def run_cli(*extra):
        return subprocess.run([*common, *extra], capture_output=True, text=True, cwd=tmp_path)

    # --merged-dir that cannot be created: named before any model is loaded.
    line = _one_error_line(run_cli(*adapter, "--base", str(tiny["base"]), "--merged-dir", str(blocker / "m"),
                                   "--output-dir", str(tmp_path / "o1")))
    assert str(blocker / "m") in line and "--merged-dir" in line
    # --output-dir that cannot be created: named before anything is generated.
    line = _one_error_line(run_cli("--model", f"m={tiny['base']}", "--output-dir", str(blocker / "o")))
    assert str(blocker / "o") in line and "--output-dir" in line
    # A base that does not load: one line naming --base, no half-merged directory left.
    merged = tmp_path / "merged"
    line = _one_error_line(run_cli(*adapter, "--base", str(tmp_path / "no_such_base"), "--merged-dir", str(merged),
                                   "--output-dir", str(tmp_path / "o2")))
    assert "--base" in line and "no_such_base" in line
    assert not merged.exists() or not any(merged.iterdir())


def test_current_merges_need_no_writable_merged_dir(tiny, tmp_path, monkeypatch):
    """A read-only cache of current merges is usable: --merged-dir is write-checked only to merge.

    Tests may run as root, who can write anywhere, so the write check is observed instead.
    """
    merged = tmp_path / "merged"
    eval_posthoc.merge_adapter("a", tiny["adapter"], str(tiny["base"]), merged, dtype="float32")
    checked = []
    real_check = eval_posthoc.ensure_writable_dir
    monkeypatch.setattr(eval_posthoc, "ensure_writable_dir", lambda path, flag: checked.append(flag) or real_check(path, flag))
    argv = ["--backend", "hf", "--adapter", f"a={tiny['adapter']}", "--base", str(tiny["base"]),
            "--dataset", f"probs={tiny['data']}", "--max-tokens", "6", "--merge-dtype", "float32",
            "--merged-dir", str(merged), "--output-dir", str(tmp_path / "out"), "--bootstrap-resamples", "100"]
    summary = eval_posthoc.run(argv)
    assert checked == ["--output-dir"]
    assert result(summary, "a", "greedy_pass@1")["pass@1"] == pytest.approx(3 / 5)
    # A changed adapter must be merged again, so then the directory is checked.
    changed = make_adapter(tiny["base"], tmp_path / "adapter2", strength=0.0)
    checked.clear()
    argv[argv.index(f"a={tiny['adapter']}")] = f"a={changed}"
    summary = eval_posthoc.run(argv[:-4] + ["--output-dir", str(tmp_path / "out2"), "--bootstrap-resamples", "100"])
    assert checked[:2] == ["--output-dir", "--merged-dir"] and "--merged-dir" in checked
    assert result(summary, "a", "greedy_pass@1")["pass@1"] == pytest.approx(1 / 5)
