"""Native LoRA (rft.openrlhf.native_lora) in the real vLLM 0.15.1 engine, CPU build, TP 1 and TP 2.

The model is a tiny Llama built here from a config (random weights, 2 layers, hidden 256, 4
query and 2 KV heads of 64; the character tokenizer of ``rft.tiny``), because vLLM's CPU build
cannot serve gpt-oss with LoRA as shipped: with ``enable_lora`` it wraps gpt-oss's MoE layer too,
and that wrapper's CPU path calls a Triton kernel the build lacks. The last test serves
``rft.tiny``'s gpt-oss at TP 2 with a test-only stand-in for that wrapper (the experts are left
unwrapped; the adapter targets attention only), which checks gpt-oss's own name mapping and
packing of q/k/v with native LoRA.

The engine runs in a subprocess (``tests/native_lora_engine.py``). What this file checks against
references it computes itself with plain transformers and PEFT in fp32:

* after each sync the engine's prompt log-probs (380 teacher-forced tokens) equal PEFT's, with the
  adapter unmerged, within :data:`LOGPROB_TOL`, for B entries from 1e-5 to 1e-2; the engine's
  error does not grow with the update (it stays at the base model's bf16 floor);
* where a bf16 forward can resolve the change at all (B of 1e-3 and up), the engine's change of
  log-probs from the base is PEFT's (slope :data:`NATIVE_SLOPE_RANGE`). For B of 1e-5 and 1e-4
  the change (about 6e-5 and 6e-4 nats rms) is below the resolution of any bf16 forward: vLLM's
  LoRA adds its output in place to the bf16 output of the base layer (``bgmv_expand_slice``,
  ``vllm/lora/ops/torch_ops/lora_ops.py:126``), and PEFT in bf16 does the same, so there the
  adapter's presence is checked in the slots themselves (bit for bit) rather than in log-probs;
* the merged sync's equivalent, ``bf16(W0 + scale * B @ A)`` computed here and evaluated in fp32,
  keeps only a few percent of a 1e-5 update and about half of a 1e-4 one, as issue 15's table
  predicts (a test that shows the gap, not one that hides it);
* every TP rank's adapter slots hold exactly its slice of the adapter (vLLM slices, rft does not);
* generations change with the adapter, and a zero adapter or the adapter's removal gives back
  the base model's very tokens and log-probs; each sync has a new name and id and the old one
  is gone from every worker;
* the generation KL the trainer will log (``rft.openrlhf.gen_kl``), on the engine's own greedy
  tokens and log-probs against PEFT's, stays at the bf16 floor after every sync, and is hundreds
  of times larger for an engine that still serves the base model while the trainer holds the 1e-2
  adapter;
* an adapter holding NaN is refused, and (TP 1) one naming a module vLLM does not wrap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
RANK, ALPHA = 8, 16
SCALE = ALPHA / RANK
SIZES = (1e-5, 1e-4, 1e-3, 1e-2)
"""Standard deviations of the B entries: about t * LR after t Adam steps at the 20b's LR (issue 15)."""
PROJ_SHAPES = {"q": (256, 256), "k": (128, 256), "v": (128, 256), "o": (256, 256)}
"""(out, in) of the tiny Llama's attention projections."""
GEN_KL_SERVED_TOL = 1e-4
"""Generation KL (k3, per-sequence max) allowed between the engine and fp32 PEFT on the engine's
greedy tokens after a sync: the bf16 floor of this nearly flat tiny model is about 2e-6."""
GPTOSS_PROJ_SHAPES = {"q": (256, 128), "k": (128, 128), "v": (128, 128), "o": (128, 256)}
"""(out, in) of rft.tiny's gpt-oss: hidden 128, 4 query and 2 KV heads of 64."""
GPTOSS_SIZES = (1e-3, 1e-2)
MOE_LOGPROB_TOL = 0.05
"""gpt-oss: the largest single-token difference allowed. Its top-2 expert routing is discrete, so a
token whose experts nearly tie may be routed differently in bf16 and fp32 (one of 380 tokens was,
by 0.018); 99 % of the tokens must still be within :data:`LOGPROB_TOL`."""
LAYERS = 2
LOGPROB_TOL = 0.01
"""Largest |log-prob| difference allowed between the bf16 engine and fp32 PEFT, per token
(measured: at most 6.4e-3 at TP 1, the same as for the base model without an adapter)."""
RESOLVED_SIZES = (1e-3, 1e-2)
"""B sizes whose change of log-probs a bf16 forward resolves on this model (rms 6e-3 nats and up)."""
NATIVE_SLOPE_RANGE = (0.95, 1.05)
"""The engine's change of log-probs from the base, regressed on PEFT's: the share of the update
served (measured 1.011 and 1.002 at TP 1)."""


# ----------------------------------------------------------------------------- the model and adapters
def build_tiny_llama(dest: Path) -> dict:
    """A tiny Llama (bf16 safetensors) and the character tokenizer, from a config; no hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rft.tiny import build_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(dest)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(str(dest))
    return config.to_dict()


def random_adapter(size: float, seed: int, shapes: dict = PROJ_SHAPES) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{checkpoint name: (A, B)}`` on q/k/v/o: A as PEFT initializes it, B entries of std ``size``."""
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in range(LAYERS):
        for proj, (out_dim, in_dim) in shapes.items():
            a = (torch.rand(RANK, in_dim, generator=gen) * 2 - 1) / in_dim**0.5
            b = torch.randn(out_dim, RANK, generator=gen) * size
            adapter[f"model.layers.{layer}.self_attn.{proj}_proj.weight"] = (a, b)
    return adapter


def prompt_logprobs(model, prompts: list[list[int]]) -> list[list[float]]:
    """Log-prob of every prompt token after the first, teacher-forced, in fp32."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            rows.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return rows


def peft_logprobs(model_dir: Path, adapter, prompts) -> list[list[float]]:
    """The trainer's view: the bf16 checkpoint in fp32 with the adapter unmerged through PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, (a, b) in adapter.items():
            layer = peft_model.base_model.model.get_submodule(name.removesuffix(".weight"))
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return prompt_logprobs(peft_model.eval(), prompts)


def merged_logprobs(model_dir: Path, adapter, prompts) -> list[list[float]]:
    """The merged sync's view: weights ``bf16(W0 + scale * B @ A)``, evaluated in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, (a, b) in adapter.items():
            weight = model.get_parameter(name)
            weight.copy_((weight.float() + SCALE * (b @ a)).to(torch.bfloat16))
    return prompt_logprobs(model.float().eval(), prompts)


def flat(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row], dtype=torch.float64)


def slope(change: torch.Tensor, reference: torch.Tensor) -> float:
    """Least-squares slope of ``change`` on ``reference`` through 0: the share of the update seen."""
    return float((change @ reference) / (reference @ reference))


def expected_slots(adapter, tp: int, rank: int, layer: int = 0) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Rank ``rank``'s slice of layer ``layer``'s adapter as vLLM should hold it, sliced here by hand:
    q/k/v B rows by head (A whole), o_proj A columns (B whole), B with the scale in it, in bf16."""
    prefix = f"model.layers.{layer}.self_attn"
    served = {p: (adapter[f"{prefix}.{p}_proj.weight"][0].to(torch.bfloat16),
                  (adapter[f"{prefix}.{p}_proj.weight"][1] * SCALE).to(torch.bfloat16)) for p in "qkvo"}
    qkv_b = []
    for p in "qkv":
        rows = served[p][1].shape[0] // tp
        qkv_b.append(served[p][1][rank * rows : (rank + 1) * rows])
    cols = served["o"][0].shape[1] // tp
    return {
        "qkv_proj": {"a": [served[p][0] for p in "qkv"], "b": qkv_b},
        "o_proj": {"a": [served["o"][0][:, rank * cols : (rank + 1) * cols]], "b": [served["o"][1]]},
    }


# ----------------------------------------------------------------------------- running the engine
@pytest.fixture(scope="module")
def stand(tmp_path_factory):
    """The tiny model, the adapters in sync order and the fp32 references, built once."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    from native_lora_engine import PROMPTS
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("native_lora")
    model_dir = root / "model"
    build_tiny_llama(model_dir)
    adapters = {f"b{size:g}": {"scale": SCALE, "adapter": random_adapter(size, seed)}
                for seed, size in enumerate(SIZES)}
    last = adapters[f"b{SIZES[-1]:g}"]["adapter"]
    adapters["zero"] = {"scale": SCALE, "adapter": {n: (a, torch.zeros_like(b)) for n, (a, b) in last.items()}}
    torch.save(adapters, root / "adapters.pt")
    base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    refs = {"base": prompt_logprobs(base, PROMPTS)}
    for label, entry in adapters.items():
        refs[label] = {"peft": peft_logprobs(model_dir, entry["adapter"], PROMPTS),
                       "merged": merged_logprobs(model_dir, entry["adapter"], PROMPTS)}
    return {"root": root, "model": model_dir, "adapters": adapters, "refs": refs}


def run_engine(stand: dict, tp: int, env_extra: dict | None = None) -> dict:
    out = stand["root"] / f"report_tp{tp}.json"
    if out.exists():
        return json.loads(out.read_text())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "rft" / "cpu_site"), str(TESTS.parent)]),
        "RFT_CPU_STAND_INS": "1",
        # vLLM's CPU build at TP 2 on one NUMA node, a small KV cache, no inductor compile at start
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
        "TORCHDYNAMO_DISABLE": "1", **(env_extra or {}),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "native_lora_engine.py"), str(stand["model"]), str(stand["root"] / "adapters.pt"),
         str(tp), str(out)], env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def engine_logprobs(step: dict) -> torch.Tensor:
    return flat([row["prompt_logprobs"] for row in step["rows"]])


# ----------------------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_engine_serves_the_trainers_policy_for_every_update_size(stand, tp):
    report = run_engine(stand, tp)
    steps = {s["label"]: s for s in report["steps"]}
    refs = stand["refs"]
    base_engine = engine_logprobs(steps["base"])
    floor = (base_engine - flat(refs["base"])).abs()
    assert floor.max() < LOGPROB_TOL
    for size in SIZES:
        label = f"b{size:g}"
        got, want = engine_logprobs(steps[label]), flat(refs[label]["peft"])
        error = (got - want).abs()
        assert error.max() < LOGPROB_TOL, (label, float(error.max()))
        assert error.mean() < 1.5 * floor.mean(), (label, float(error.mean()), float(floor.mean()))
        if size in RESOLVED_SIZES:
            share = slope(got - base_engine, want - flat(refs["base"]))
            assert NATIVE_SLOPE_RANGE[0] < share < NATIVE_SLOPE_RANGE[1], (label, share)
        evidence = steps[label]["evidence"]
        assert evidence["workers"] == tp and evidence["modules"] == 2 * LAYERS and evidence["tensors"] == 8 * LAYERS
        # the served share: A and scale * B rounded to bf16 keep the product's norm to 1 %
        assert evidence["delta_norm"] == pytest.approx(evidence["target_norm"], rel=1e-2)


def continuation_logprobs(model_dir: Path, adapter, rows: list[dict]) -> list[list[float]]:
    """The trainer's log-probs (fp32 PEFT) of the tokens the engine generated, after their prompt."""
    from native_lora_engine import PROMPTS

    full = [prompt + row["tokens"] for prompt, row in zip(PROMPTS, rows)]
    return [lp[len(prompt) - 1 :] for prompt, lp in zip(PROMPTS, peft_logprobs(model_dir, adapter, full))]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_generation_kl_of_the_engine_against_the_trainer_stays_under_the_warning(stand, tp):
    """The measure the trainer will log, on the engine's own generated tokens and log-probs."""
    from rft.openrlhf.gen_kl import GEN_KL_WARN, generation_kl

    report = run_engine(stand, tp)

    def kl_against_trainer(rows: list[dict], label: str) -> dict:
        trainer = continuation_logprobs(stand["model"], stand["adapters"][label]["adapter"], rows)
        engine = torch.tensor([row["token_logprobs"] for row in rows])
        return generation_kl(engine, torch.tensor(trainer), torch.ones_like(engine))

    served = []
    for step in report["steps"]:
        if step["evidence"] is not None:
            kl = kl_against_trainer(step["rows"], step["label"])
            assert kl["gen_kl_seq_max"] < GEN_KL_SERVED_TOL < GEN_KL_WARN, (step["label"], kl)  # at most 4.5e-6
            served.append(kl["gen_kl"])
    # an engine still serving the base model while the trainer holds the 1e-2 adapter: measured
    # 3.0e-3 (TP 1) and 1.6e-3 (TP 2), around the warning level and far above a served adapter's
    stale = kl_against_trainer(next(s for s in report["steps"] if s["label"] == "base")["rows"], f"b{SIZES[-1]:g}")
    assert stale["gen_kl"] > 100 * max(served), (stale, served)


@pytest.mark.slow
def test_merged_sync_loses_a_small_update_that_native_keeps(stand):
    """Documents the gap of issue 15: bf16(W0 + delta) serves a small update only in part."""
    refs = stand["refs"]
    base = flat(refs["base"])
    shares = {}
    for size in SIZES:
        label = f"b{size:g}"
        shares[size] = slope(flat(refs[label]["merged"]) - base, flat(refs[label]["peft"]) - base)
    # measured 0.031, 0.535, 0.981, 0.999; issue 15's table loses 98.8 %, 87.7 % and 2.7 % at 1e-5, 1e-4, 1e-2
    assert shares[1e-5] < 0.1, shares  # the first steps' update never reaches the engine
    assert shares[1e-4] < 0.8, shares
    assert shares[1e-2] > 0.95, shares  # a large update survives the rounding


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_every_rank_holds_its_slice_of_the_adapter(stand, tp):
    report = run_engine(stand, tp)
    for step in report["steps"]:
        if step["evidence"] is None:  # the base model and after removal: no adapter to read back
            continue
        adapter = stand["adapters"][step["label"]]["adapter"]
        assert sorted(reply["rank"] for reply in step["slots"]) == list(range(tp))
        for reply in step["slots"]:
            want = expected_slots(adapter, tp, reply["rank"])
            for proj, kinds in want.items():
                for kind, tensors in kinds.items():
                    for got, exp in zip(reply[proj][kind], tensors, strict=True):
                        got = torch.tensor(got)
                        rows, cols = exp.shape
                        assert torch.equal(got[:rows, :cols], exp.float()), (step["label"], proj, kind)
                        assert not got[rows:].any() and not got[:, cols:].any()  # rank padding stays zero


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_generations_follow_the_adapter_and_come_back_to_the_base(stand, tp):
    report = run_engine(stand, tp)
    steps = {s["label"]: s for s in report["steps"]}
    base_rows = steps["base"]["rows"]
    assert [r["tokens"] for r in steps[f"b{SIZES[-1]:g}"]["rows"]] != [r["tokens"] for r in base_rows]
    assert steps["zero"]["rows"] == base_rows  # tokens and log-probs, exactly
    assert steps["removed"]["rows"] == base_rows and report["removed"] == [True] * tp
    adapter_steps = [s for s in report["steps"] if s["evidence"] is not None]
    names = [s["lora_name"] for s in adapter_steps]
    assert len(set(names)) == len(names)  # the prefix cache keys on the name: a new one per sync
    for version, step in enumerate(adapter_steps, start=1):
        assert step["evidence"]["lora_id"] == version
        assert step["held"] == [[version]] * tp  # the previous adapter was removed from every worker
    assert steps["removed"]["held"] == [[]] * tp


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_an_adapter_holding_nan_is_refused(stand, tp):
    report = run_engine(stand, tp)
    assert report["nan"]["refused"] and "NaN or inf" in report["nan"]["error"]
    assert report["nan"]["version_after"] == len(stand["adapters"])  # the engine's version did not move


@pytest.mark.slow
def test_an_adapter_on_a_module_vllm_does_not_wrap_is_refused_and_the_current_one_kept(stand):
    report = run_engine(stand, 1)
    assert report["unserved"]["refused"] and "no LoRA layer" in report["unserved"]["error"]
    assert report["unserved"]["version_after"] == len(stand["adapters"])
    assert report["unserved"]["held"] == [[len(stand["adapters"])]]


# ----------------------------------------------------------------------------- gpt-oss, MoE left unwrapped
@pytest.fixture(scope="module")
def gptoss_stand(tmp_path_factory):
    """rft.tiny's gpt-oss (untrained, bf16 experts, attention sinks), two adapters and a zero one."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    from native_lora_engine import PROMPTS
    from transformers import AutoModelForCausalLM

    from rft.tiny import build_model

    root = tmp_path_factory.mktemp("native_lora_gptoss")
    model_dir = root / "model"
    build_model(model_dir, steps=0, progress=False)
    adapters = {f"b{size:g}": {"scale": SCALE, "adapter": random_adapter(size, 10 + seed, GPTOSS_PROJ_SHAPES)}
                for seed, size in enumerate(GPTOSS_SIZES)}
    last = adapters[f"b{GPTOSS_SIZES[-1]:g}"]["adapter"]
    adapters["zero"] = {"scale": SCALE, "adapter": {n: (a, torch.zeros_like(b)) for n, (a, b) in last.items()}}
    torch.save(adapters, root / "adapters.pt")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    refs = {"base": prompt_logprobs(base, PROMPTS)}
    for label, entry in adapters.items():
        refs[label] = {"peft": peft_logprobs(model_dir, entry["adapter"], PROMPTS)}
    return {"root": root, "model": model_dir, "adapters": adapters, "refs": refs}


@pytest.mark.slow
def test_gpt_oss_attention_adapter_served_natively_at_tp2_with_the_moe_left_unwrapped(gptoss_stand):
    """gpt-oss at TP 2: its name mapper (.self_attn. -> .attn.) and packed qkv_proj with native LoRA.

    Test-only stand-in: vLLM's CPU build cannot run its MoE LoRA wrapper (Triton), so the driver
    leaves the experts unwrapped (``leave_moe_unwrapped`` in tests/native_lora_engine.py). The
    adapter targets attention only, where that wrapper would add nothing; on the node vLLM wraps
    the experts with its Triton or Marlin MXFP4 LoRA backend instead.
    """
    from native_lora_engine import MOE_UNWRAPPED_ENV

    report = run_engine(gptoss_stand, 2, {MOE_UNWRAPPED_ENV: "1"})
    steps = {s["label"]: s for s in report["steps"]}
    refs = gptoss_stand["refs"]
    base_engine = engine_logprobs(steps["base"])
    floor = (base_engine - flat(refs["base"])).abs()
    assert floor.max() < LOGPROB_TOL
    for size in GPTOSS_SIZES:
        label = f"b{size:g}"
        got, want = engine_logprobs(steps[label]), flat(refs[label]["peft"])
        error = (got - want).abs()
        # measured: max 4.1e-3 at 1e-3; at 1e-2 one token of 380 is off by 0.018, the rest by 4e-3 at most
        assert error.quantile(0.99) < LOGPROB_TOL and error.max() < MOE_LOGPROB_TOL, (label, float(error.max()))
        assert error.mean() < 1.5 * floor.mean(), (label, float(error.mean()), float(floor.mean()))
        share = slope(got - base_engine, want - flat(refs["base"]))
        assert NATIVE_SLOPE_RANGE[0] < share < NATIVE_SLOPE_RANGE[1], (label, share)  # measured 0.996, 0.998
        assert steps[label]["evidence"]["modules"] == 2 * LAYERS  # qkv_proj and o_proj of both layers
        for reply in steps[label]["slots"]:
            want_slots = expected_slots(gptoss_stand["adapters"][label]["adapter"], 2, reply["rank"])
            for proj, kinds in want_slots.items():
                for kind, tensors in kinds.items():
                    for got_slot, exp in zip(reply[proj][kind], tensors, strict=True):
                        assert torch.equal(torch.tensor(got_slot)[: exp.shape[0], : exp.shape[1]], exp.float())
    assert steps["zero"]["rows"] == steps["base"]["rows"] and steps["removed"]["rows"] == steps["base"]["rows"]
    assert report["nan"]["refused"]
