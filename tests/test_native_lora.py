"""Unit tests of the pure parts of native LoRA (rft.openrlhf.native_lora) and of the generation
KL (rft.openrlhf.gen_kl). The real engine runs in tests/test_native_lora_engine.py.

Expected values are written out by hand (with ``math.e`` where a value is ``e``-based)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rft.openrlhf import gen_kl, native_lora
from rft.openrlhf.lora_sync import pack_tensors


# ----------------------------------------------------------------------------- generation KL
def test_k3_kl_token_mean_and_sequence_tail_match_a_hand_computation():
    engine = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -3.0, -3.0]])
    trainer = torch.tensor([[-1.0, -1.0, 5.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third sequence has no response token
    # masked tokens: log r = 0 -> 0; log r = 1 -> e - 2; log r = -1 -> 1/e
    seq0, seq1 = (math.e - 2) / 2, 1 / math.e
    got = gen_kl.generation_kl(engine, trainer, mask)
    assert got["gen_kl"] == pytest.approx((math.e - 2 + 1 / math.e) / 3, rel=1e-12)
    assert got["gen_kl_seq_max"] == pytest.approx(seq1, rel=1e-12)
    assert got["gen_kl_seq_p99"] == pytest.approx(seq0 + 0.99 * (seq1 - seq0), rel=1e-12)  # numpy's linear p99


def test_identical_policies_have_zero_kl_and_padding_is_ignored():
    logp = torch.tensor([[-0.3, -2.0], [-1.0, -0.1]])
    padded = logp.clone()
    padded[1, 1] = 7.0  # a padded position the trainer filled with garbage
    got = gen_kl.generation_kl(logp, padded, torch.tensor([[1, 1], [1, 0]]))
    assert got == {"gen_kl": 0.0, "gen_kl_seq_max": 0.0, "gen_kl_seq_p99": 0.0}


def test_a_token_the_engine_gave_probability_zero_shows_as_a_finite_huge_kl():
    got = gen_kl.generation_kl(torch.tensor([[-math.inf]]), torch.tensor([[0.0]]), torch.tensor([[1]]))
    assert got["gen_kl"] == pytest.approx(math.exp(20.0) - 21.0)


def test_no_response_tokens_gives_nan_and_mismatched_shapes_say_so():
    got = gen_kl.generation_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert all(math.isnan(v) for v in got.values())
    with pytest.raises(ValueError, match="shapes differ"):
        gen_kl.generation_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))


def test_served_share_from_the_sync_norms():
    assert gen_kl.served_share(0.25, 1.0) == 0.25
    assert gen_kl.served_share(0.0, 0.0) == 1.0  # nothing intended, nothing lost
    with pytest.raises(ValueError, match="non-negative"):
        gen_kl.served_share(-1.0, 1.0)


@pytest.mark.parametrize(
    ("series", "verdict"),
    [
        ([0.001, 0.0015], "ok"),
        ([0.001, 0.003], "warn"),
        ([0.03] * 4, "warn"),  # high, but not yet for five steps
        ([0.03] * 5, "stop"),
        ([0.03, 0.03, 0.001, 0.03, 0.03, 0.03], "warn"),  # a dip breaks the streak
        ([0.0005, float("nan")], "ok"),  # a step without samples is skipped
        ([], "ok"),
    ],
)
def test_gen_kl_verdict(series, verdict):
    assert gen_kl.gen_kl_verdict(series) == verdict


# ----------------------------------------------------------------------------- native LoRA settings
def test_sync_mode_defaults_to_native_and_refuses_other_words():
    assert native_lora.sync_mode(None) == "native" and native_lora.sync_mode("") == "native"
    assert native_lora.sync_mode(" Merged ") == "merged"
    with pytest.raises(ValueError, match="RFT_LORA_SYNC='delta': use one of native, merged"):
        native_lora.sync_mode("delta")


def test_engine_arguments_round_the_rank_up_to_one_vllm_takes():
    assert native_lora.engine_lora_kwargs(32) == {
        "enable_lora": True, "max_lora_rank": 32, "max_loras": 1, "max_cpu_loras": 2,
    }
    assert native_lora.engine_lora_kwargs(24)["max_lora_rank"] == 32
    assert native_lora.engine_lora_kwargs(8, keep_previous=True)["max_loras"] == 2
    with pytest.raises(ValueError, match="--lora_rank 600"):
        native_lora.engine_lora_kwargs(600)


def test_every_sync_gets_a_new_name_and_id_and_a_path_that_is_never_a_file():
    pytest.importorskip("vllm")
    assert native_lora.lora_request_for(None) is None
    first, second = native_lora.lora_request_for(1), native_lora.lora_request_for(2)
    assert (first.lora_name, first.lora_int_id) == ("rft-policy-v1", 1)
    assert (second.lora_name, second.lora_int_id) == ("rft-policy-v2", 2)
    assert first != second  # vLLM compares requests by name; the prefix cache keys on it
    assert second.lora_path == "rft-in-memory://rft-policy-v2"
    with pytest.raises(ValueError, match="start at 1"):
        native_lora.lora_request_for(0)


# ----------------------------------------------------------------------------- the payload
def _payload_tensors(adapter: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors as the worker unpacks them from the merged sync's own codec."""
    from rft.openrlhf.lora_sync import unpack_tensors

    named = [(f"{name}:{k}", t) for name, (a, b) in adapter.items() for k, t in (("A", a), ("B", b))]
    buffer, entries = pack_tensors(named)
    return unpack_tensors(buffer, entries)


def test_scale_goes_into_b_before_the_one_cast_and_names_are_peft_names():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, 0.125]])  # r = 2, in = 3
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.001, 0.0]])  # out = 4
    tensors = _payload_tensors({"model.layers.0.self_attn.q_proj.weight": (a, b)})
    out, rank, norms = native_lora.adapter_tensors([["model.layers.0.self_attn.q_proj.weight", 3.0]], tensors,
                                                   torch.bfloat16)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert sorted(out) == [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"] and rank == 2
    assert out[f"{prefix}.lora_B.weight"].dtype == torch.bfloat16
    assert torch.equal(out[f"{prefix}.lora_B.weight"], torch.tensor(
        [[3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [0.003, 0.0]]).to(torch.bfloat16))
    product = 3.0 * (b.double() @ a.double())  # written out: the product itself, not the Gram trick
    assert norms["target_sq"] == pytest.approx(float((product**2).sum()), rel=1e-6)


def test_an_adapter_holding_nan_or_inf_is_refused_naming_the_weight():
    good = (torch.ones(2, 3), torch.ones(4, 2))
    bad_b = torch.ones(4, 2)
    bad_b[1, 1] = math.inf
    tensors = _payload_tensors({"layers.0.q_proj.weight": good, "layers.1.q_proj.weight": (good[0], bad_b)})
    targets = [["layers.0.q_proj.weight", 1.0], ["layers.1.q_proj.weight", 1.0]]
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj\.weight: the LoRA matrices hold NaN or inf"):
        native_lora.adapter_tensors(targets, tensors, torch.bfloat16)


def test_matrices_that_do_not_multiply_are_refused():
    tensors = _payload_tensors({"layers.0.q_proj.weight": (torch.ones(2, 3), torch.ones(4, 3))})
    with pytest.raises(ValueError, match="is not a 2-D product"):
        native_lora.adapter_tensors([["layers.0.q_proj.weight", 1.0]], tensors, torch.bfloat16)


def test_tp_workers_that_disagree_fail_the_sync():
    row = {"lora_id": 3, "tensors": 4, "modules": 2, "rank": 8, "target_sq": 4.0, "served_sq": 4.0,
           "unpack_s": 0.1, "apply_s": 0.2}
    evidence = native_lora.summarize_native_evidence([row, {**row, "apply_s": 0.5}], 1.0)
    assert (evidence["lora_id"], evidence["apply_s"], evidence["target_norm"], evidence["workers"]) == (3, 0.5, 2.0, 2)
    with pytest.raises(RuntimeError, match="TP workers disagree"):
        native_lora.summarize_native_evidence([row, {**row, "lora_id": 2}], 1.0)


# ----------------------------------------------------------------------------- the decode-cost bench
def test_decode_bench_writes_its_figures_with_the_flop_counts_of_gpt_oss_20b(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_lora_decode.py"
    spec = importlib.util.spec_from_file_location("bench_lora_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lora_decode.json"
    assert bench.main(["--device", "cpu", "--layers", "1", "--repeats", "1", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    # one layer, batch 64: 2 * 64 * (5120 x 2880 qkv + 2880 x 4096 o) and, at rank 32,
    # 2 * 64 * (3 x 32 x 2880 shrink + 5120 x 32 expand + 32 x 4096 + 2880 x 32 for o)
    assert result["gflop_per_step"] == {"base": 3.39738624, "lora": 0.084934656}
    assert set(result["median_ms"]) == {"base", "lora", "both"} and result["lora_share_of_projections"] > 0


# ----------------------------------------------------------------------------- the engine's version state
class _Engine:
    """Stands in for the AsyncLLMEngine client: records collective_rpc calls, answers like TP workers."""

    def __init__(self, workers: int = 2, fail: bool = False):
        self.calls: list[tuple] = []
        self.workers, self.fail = workers, fail

    async def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        if self.fail:
            raise RuntimeError("Worker failed with error 'x: the LoRA matrices hold NaN or inf'")
        row = {"lora_id": args[2], "tensors": 2, "modules": 1, "rank": 2, "target_sq": 9.0, "served_sq": 9.0,
               "unpack_s": 0.0, "apply_s": 0.0}
        return [row] * self.workers


def test_each_update_loads_the_next_version_and_moves_only_after_every_worker_took_it():
    state = native_lora.NativeLoraEngine()
    engine = _Engine()
    assert state.version is None and state.request is None
    evidence = asyncio.run(state.update(engine, {"format": "f"}, b"\x00" * 8))
    assert engine.calls == [("load_lora_native", ({"format": "f"}, b"\x00" * 8, 1, []))]
    assert state.version == 1 and evidence["lora_id"] == 1 and evidence["target_norm"] == 3.0
    asyncio.run(state.update(engine, {"format": "f"}, b""))
    assert state.version == 2 and engine.calls[-1][1][2:] == (2, [])  # nothing kept: one adapter served
    with pytest.raises(RuntimeError, match="NaN or inf"):
        asyncio.run(state.update(_Engine(fail=True), {"format": "f"}, b""))
    assert state.version == 2  # a refused sync leaves requests naming the adapter the workers still hold


def test_keep_previous_keeps_the_last_version_for_requests_still_running():
    state = native_lora.NativeLoraEngine(keep_previous=True)
    engine = _Engine(workers=1)
    asyncio.run(state.update(engine, {}, b""))
    asyncio.run(state.update(engine, {}, b""))
    assert [call[1][2:] for call in engine.calls] == [(1, []), (2, [1])]


def test_without_a_payload_the_workers_are_told_to_receive_the_broadcast():
    engine = _Engine(workers=1)
    asyncio.run(native_lora.NativeLoraEngine().update(engine, {"nbytes": 64}))
    assert engine.calls == [("load_lora_native", ({"nbytes": 64}, None, 1, [], "nccl"))]


# ----------------------------------------------------------------------------- the run's mode, per engine
def test_the_run_starts_engines_with_lora_only_in_native_mode(monkeypatch):
    logprobs = {"logprobs_mode": "processed_logprobs", "max_logprobs": 1}
    lora = {"enable_lora": True, "max_lora_rank": 32, "max_loras": 1, "max_cpu_loras": 2}
    assert native_lora.engine_kwargs(24, "native") == {**logprobs, **lora}
    assert native_lora.engine_kwargs(24, "merged") == logprobs
    assert native_lora.engine_kwargs(0, "native") == logprobs  # no LoRA policy: the engine 0.9.3 starts
    monkeypatch.delenv("RFT_LORA_SYNC", raising=False)
    assert native_lora.configured_mode() == "native" and native_lora.engine_kwargs(24) == {**logprobs, **lora}
    monkeypatch.setenv("RFT_LORA_SYNC", "merged")
    assert native_lora.engine_kwargs(24) == logprobs
    assert native_lora.configured_mode({"RFT_LORA_SYNC": "native"}) == "native"


def test_an_engine_knows_its_mode_from_how_it_was_started():
    native = native_lora.NativeLoraEngine.for_engine(native_lora.engine_kwargs(8, "native"))
    merged = native_lora.NativeLoraEngine.for_engine(native_lora.engine_kwargs(8, "merged"))
    assert native.enabled and not native.keep_previous and not merged.enabled
    assert native_lora.NativeLoraEngine.for_engine(native_lora.engine_lora_kwargs(8, keep_previous=True)).keep_previous
    merged.version = 3  # even so, a merged engine's requests name no adapter
    assert merged.request is None


class _MergedEngine(_Engine):
    async def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        row = {"changed": 3, "numel": 4, "delta_sq": 4.0, "target_sq": 4.0, "unpack_s": 0.0, "apply_s": 0.0}
        return [row] * self.workers

    async def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", ()))
        return True


def test_the_sync_goes_native_or_merged_as_the_engine_was_started(capsys):
    engine = _Engine()
    state = native_lora.NativeLoraEngine.for_engine({"enable_lora": True, "max_loras": 1})
    evidence = asyncio.run(state.sync(engine, {"format": "f"}, b"\x00"))
    assert [c[0] for c in engine.calls] == ["load_lora_native"] and evidence["lora_id"] == 1
    assert "rft weight sync: native LoRA, serving rft-policy-v1" in capsys.readouterr().out
    merged_engine = _MergedEngine()
    evidence = asyncio.run(native_lora.NativeLoraEngine.for_engine({}).sync(merged_engine, {"format": "f"}, b"\x00"))
    assert [c[0] for c in merged_engine.calls] == ["apply_lora_delta", "reset_prefix_cache"]
    assert evidence["changed_frac"] == 0.75 and evidence["delta_norm"] == pytest.approx(math.sqrt(8.0))


def test_the_cpu_stand_in_leaves_only_the_experts_out_of_vllms_lora_wrapping():
    """rft.cpu_stand_ins' replacement for vLLM's MoE LoRA wrapper, on vLLM 0.15.1's own matcher."""
    import types

    from vllm.lora.model_manager import LoRAModelManager

    from rft.cpu_stand_ins import moe_left_out_of_lora

    cls = type("Manager", (), {"_match_target_modules": LoRAModelManager._match_target_modules})
    manager = cls()
    manager.supported_lora_modules = ["qkv_proj", "o_proj", "experts"]
    assert manager._match_target_modules("model.layers.0.mlp.experts")  # what vLLM wraps as shipped
    moe_left_out_of_lora(types.SimpleNamespace(LoRAModelManager=cls))
    moe_left_out_of_lora(types.SimpleNamespace(LoRAModelManager=cls))  # installed once
    assert not manager._match_target_modules("model.layers.0.mlp.experts")
    assert manager._match_target_modules("model.layers.0.attn.qkv_proj")
    assert manager._match_target_modules("model.layers.1.attn.o_proj")
    assert not manager._match_target_modules("model.layers.0.mlp.router")
