"""rft.openrlhf.vllm_lora_delta: the engine's and the workers' half of the LoRA sync, as plain code.

No patch is applied here: the module is called the way ``vllm_engine.patch`` and
``vllm_worker.patch`` call it, on the tensor-parallel emulation of vLLM 0.15.1's gpt-oss
attention loading (``tests/tp_emulation.py``, TP 1, 2 and 4; its ``collective_rpc`` crosses
msgpack, and pickle per worker for TP > 1, as vLLM's does). ``tests/test_lora_sync.py`` checks
that the patched OpenRLHF files reach this code, and ``tests/test_hook_vllm_lora_delta_engine.py``
runs it inside the real vLLM 0.15.1 engine.

What the groups prove:
* crossing: the trainer's packed bytes survive msgpack bit for bit and a tensor would not;
  the engine turns every form the object store hands it into ``bytes``;
* TP merge: after 1, 2 and 50 random syncs every rank holds exactly the shard of
  ``bf16(W0 + delta_N)``; entries the adapter does not touch stay bitwise equal; a zero adapter
  leaves W0 bitwise (-0.0 included); targets dropped by a later adapter return to W0; small
  updates that round away show in the evidence; chunking and the pristine copy's place change
  nothing; a buffer broadcast over the model-update group (``receive="nccl"``, either kind of
  group) merges as bytes do;
* refusals: a wrong format, a short payload, a NaN adapter, a quantized or unknown target fail
  in one line and write nothing;
* evidence: the engine's summary of its workers, by hand.
"""

from __future__ import annotations

import asyncio
import math
import types

import numpy as np
import pytest
import torch

import tp_emulation as emu
from rft import contract
from rft.openrlhf import vllm_lora_delta as vld
from tp_emulation import adapter_payload, assert_bitwise, bits, merged_checkpoint, random_adapter

TINY = {"layers": 2, "hidden": 64, "heads": 8, "kv_heads": 2, "head_dim": 8}


class Worker:
    """vLLM's worker as the sync sees it, with the two methods ``vllm_worker.patch`` gives it."""

    def apply_lora_delta(self, spec, blob=None, receive="bytes"):
        return vld.apply_lora_delta(self, spec, blob, receive)

    def update_weight_from_ray_ref(self, name, dtype, shape, blob):
        return vld.update_weight_from_ray_ref(self, name, dtype, shape, blob)


def sync(llm, adapter, dtype=torch.float32) -> dict:
    """One sync through the engine's hook, as ``LLMRayActor.apply_lora_update`` makes it."""
    return asyncio.run(vld.apply_lora_update(llm, *adapter_payload(vld, adapter, dtype)))


def make_engine(geo, tp, checkpoint):
    """``tp`` emulated ranks serving ``checkpoint``, behind an emulated engine client."""
    models = [emu.build_rank(geo, r, tp, checkpoint) for r in range(tp)]
    return models, emu.EmulatedAsyncLLM([emu.make_worker(Worker, m) for m in models])


def check_ranks(models, geo, tp, checkpoint, adapter, initial):
    """Every rank equals the shard of bf16(W0 + delta); what no adapter reaches is W0 bitwise."""
    reference = merged_checkpoint(checkpoint, adapter)
    for r, model in enumerate(models):
        got = emu.state_copy(model)
        assert_bitwise(got, emu.state_copy(emu.build_rank(geo, r, tp, reference)))
        for name, value in initial[r].items():
            if not name.endswith(("qkv_proj.weight", "o_proj.weight")):
                assert torch.equal(bits(got[name]), bits(value)), name


# ----------------------------------------------------------------------------- crossing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_bytes_cross_msgpack_and_unpack_bitwise(dtype):
    tensors = emu.codec_sample_tensors(dtype)
    buffer, entries = vld.pack_tensors(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert all(offset % 64 == 0 for _, _, _, offset, _ in entries)  # every slice viewable as any dtype
    crossed_entries, blob = emu.msgpack_roundtrip([entries, vld.payload_bytes(buffer.numpy())])
    assert isinstance(blob, bytes) and crossed_entries == entries
    out = vld.unpack_tensors(vld.bytes_to_uint8(blob).clone(), crossed_entries)
    for name, tensor in tensors:
        assert out[name].dtype == dtype and out[name].shape == tensor.shape
        assert torch.equal(bits(out[name]), bits(tensor)), name


def test_unpack_rejects_a_corrupt_index():
    buffer, entries = vld.pack_tensors([("w", torch.ones(4, 4))])
    with pytest.raises(ValueError, match="does not fit"):
        vld.unpack_tensors(buffer, [[entries[0][0], "float32", [4, 5], entries[0][3], entries[0][4]]])
    with pytest.raises(ValueError, match="unknown dtype"):
        vld.unpack_tensors(buffer, [["w", "int8", [4, 4], 0, 16]])


def test_tensors_do_not_survive_the_crossing_but_bytes_do():
    """Why the payload is bytes: a tensor argument arrives as a list on the worker's side."""
    crossed = emu.msgpack_roundtrip([torch.ones(2, dtype=torch.bfloat16), b"\x00\x01"])
    assert isinstance(crossed[0], list) and crossed[1] == b"\x00\x01"


def test_every_form_of_the_payload_becomes_the_same_bytes():
    raw = bytes(range(200))
    forms = [raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, dtype=np.uint8)]
    assert all(vld.payload_bytes(form) == raw for form in forms)
    assert all(bytes(vld.bytes_to_uint8(form).numpy()) == raw for form in forms)
    assert vld.bytes_to_uint8(b"").numel() == 0
    with pytest.raises(TypeError, match="bytes or a uint8 array"):
        vld.payload_bytes([1, 2, 3])


def test_worker_device_reads_the_cpu_workers_model_runner():
    """vLLM's CPUWorker never sets ``device``; its model runner's device is the truth there."""
    cpu_worker = types.SimpleNamespace(device=None, model_runner=types.SimpleNamespace(device="cpu"))
    assert vld.worker_device(cpu_worker) == torch.device("cpu")
    gpu_worker = types.SimpleNamespace(device=torch.device("cuda", 1), model_runner=None)
    assert vld.worker_device(gpu_worker) == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- names and chunks
def test_hf_names_resolve_to_the_fused_served_parameters():
    served = emu.GptOssForCausalLM(TINY)
    params = dict(served.named_parameters())
    for proj, want in (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"), ("o_proj", "o_proj")):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert vld.resolve_vllm_param(served, name, params) == f"model.layers.1.attn.{want}.weight"
    with pytest.raises(ValueError, match="no parameter for this weight"):
        vld.resolve_vllm_param(served, "model.layers.1.self_attn.qq_proj.weight", params)


@pytest.mark.parametrize(
    "costs, budget, chunks",
    [
        ({"a": 3, "b": 3, "c": 5}, 6, [["a", "b"], ["c"]]),
        ({"a": 3, "b": 3, "c": 5}, 0, [["a"], ["b"], ["c"]]),  # too small: one parameter each
        ({"a": 3, "b": 3, "c": 5}, 100, [["a", "b", "c"]]),
        ({"a": 9, "b": 1}, 4, [["a"], ["b"]]),  # one costlier than the budget still gets a chunk
        ({}, 4, []),
    ],
)
def test_plan_chunks_keeps_order_and_budget(costs, budget, chunks):
    assert vld.plan_chunks(costs, budget) == chunks


def test_engine_evidence_sums_shards_by_hand():
    workers = [
        {"changed": 3, "numel": 10, "delta_sq": 9.0, "target_sq": 25.0, "unpack_s": 0.1, "apply_s": 0.5},
        {"changed": 1, "numel": 10, "delta_sq": 16.0, "target_sq": 25.0, "unpack_s": 0.2, "apply_s": 0.4},
    ]
    assert vld.summarize_lora_evidence(workers, 1.5, None) == {
        "engine_s": 1.5, "unpack_s": 0.2, "apply_s": 0.5, "delta_norm": 5.0, "target_norm": 5.0,
        "changed_frac": 0.2, "workers": 2.0, "prefix_cache_reset": 1.0,
    }
    assert vld.summarize_lora_evidence(workers[:1], 0.0, False)["prefix_cache_reset"] == 0.0
    with pytest.raises(RuntimeError, match="no worker results"):
        vld.summarize_lora_evidence([], 0.0, True)


# ----------------------------------------------------------------------------- TP merge
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_equal_merged_reference_after_1_2_and_50_syncs(tp):
    checkpoint = emu.random_attention_checkpoint(TINY, seed=tp)
    models, llm = make_engine(TINY, tp, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    targets = [(0, "q_proj"), (0, "v_proj"), (0, "o_proj"), (1, "k_proj")]  # layer 1 q/v/o stay base
    for step in range(1, 51):
        adapter = random_adapter(TINY, targets, seed=1000 * tp + step)
        evidence = sync(llm, adapter)
        if step in (1, 2, 50):
            check_ranks(models, TINY, tp, checkpoint, adapter, initial)
    assert llm.calls == ["apply_lora_delta"] * 50 and llm.prefix_cache_resets == 50
    # each sync is one load_weights call per rank for all its parameters, never one per tensor
    assert all(m.load_calls == 50 for m in models)

    # the last sync's evidence, recomputed from the served weights
    touched = [n for n in initial[0] if n.endswith(("qkv_proj.weight", "o_proj.weight"))]
    diff_sq = sum(float((m.get_parameter(n).float() - i[n].float()).square().sum()) for m, i in zip(models, initial) for n in touched)
    changed = sum(int((bits(m.get_parameter(n)) != bits(i[n])).sum()) for m, i in zip(models, initial) for n in touched)
    numel = sum(i[n].numel() for i in initial for n in touched if n.startswith(("model.layers.0.", "model.layers.1.attn.qkv")))
    assert math.isclose(evidence["delta_norm"], math.sqrt(diff_sq), rel_tol=1e-5)
    assert math.isclose(evidence["changed_frac"], changed / numel, rel_tol=1e-9)
    assert 0 < evidence["changed_frac"] < 1 and evidence["workers"] == tp
    target_sq = sum(float(((b @ a) * s).square().sum()) for a, b, s in adapter.values())
    assert math.isclose(evidence["target_norm"], math.sqrt(target_sq), rel_tol=1e-5)


def test_bf16_adapter_payload_is_merged_exactly():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=5)
    models, llm = make_engine(TINY, 2, checkpoint)
    adapter = random_adapter(TINY, [(1, "q_proj"), (1, "o_proj")], seed=9)
    adapter = {n: (a.bfloat16(), b.bfloat16(), s) for n, (a, b, s) in adapter.items()}
    sync(llm, adapter, torch.bfloat16)
    reference = merged_checkpoint(checkpoint, adapter, torch.bfloat16)
    for r, model in enumerate(models):
        assert_bitwise(emu.state_copy(model), emu.state_copy(emu.build_rank(TINY, r, 2, reference)))


def test_zero_adapter_leaves_w0_bitwise_even_negative_zero():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=3)
    checkpoint["model.layers.0.self_attn.q_proj.weight"][0, :4] = -0.0  # signed zeros must survive
    models, llm = make_engine(TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    adapter = random_adapter(TINY, [(0, "q_proj"), (0, "k_proj"), (0, "v_proj"), (0, "o_proj")], seed=4)
    zero = {n: (a, torch.zeros_like(b), s) for n, (a, b, s) in adapter.items()}  # PEFT initialises B to 0
    evidence = sync(llm, zero)
    for model, before in zip(models, initial):
        assert_bitwise(emu.state_copy(model), before)
    assert evidence["delta_norm"] == 0.0 and evidence["changed_frac"] == 0.0


def test_resync_is_idempotent_and_dropped_targets_return_to_base():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=7)
    models, llm = make_engine(TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    first = random_adapter(TINY, [(0, "q_proj"), (1, "o_proj")], seed=11)
    for _ in range(2):
        sync(llm, first)
    check_ranks(models, TINY, 2, checkpoint, first, initial)
    second = random_adapter(TINY, [(1, "o_proj")], seed=12)  # layer 0 q no longer adapted
    sync(llm, second)
    check_ranks(models, TINY, 2, checkpoint, second, initial)
    for model, before in zip(models, initial):
        assert_bitwise(emu.state_copy(model), before, ["model.layers.0.attn.qkv_proj.weight"])


def test_small_update_vanishes_on_the_bf16_grid_and_evidence_shows_it():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=8)
    models, llm = make_engine(TINY, 1, checkpoint)
    initial = [emu.state_copy(models[0])]
    small = random_adapter(TINY, [(0, "q_proj")], seed=13, magnitude=1e-3)
    evidence = sync(llm, small)
    assert evidence["target_norm"] > 0
    assert evidence["changed_frac"] < 0.05  # most of a ~1e-6 delta rounds away next to ~2e-2 weights
    check_ranks(models, TINY, 1, checkpoint, small, initial)


def test_pristine_copy_on_device_gives_the_same_result(monkeypatch):
    monkeypatch.setenv(contract.ENV_LORA_PRISTINE, "gpu")  # "keep it on the worker's device" (the CPU here)
    checkpoint = emu.random_attention_checkpoint(TINY, seed=21)
    models, llm = make_engine(TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    adapter = random_adapter(TINY, [(0, "q_proj"), (0, "o_proj")], seed=22)
    sync(llm, adapter)
    check_ranks(models, TINY, 2, checkpoint, adapter, initial)
    monkeypatch.setenv(contract.ENV_LORA_PRISTINE, "disk")
    _, fresh = make_engine(TINY, 1, checkpoint)
    with pytest.raises(ValueError, match="RFT_LORA_PRISTINE='disk'"):
        sync(fresh, adapter)


def test_scratch_budget_chunks_give_the_same_result(monkeypatch):
    monkeypatch.setenv(contract.ENV_LORA_SCRATCH_MB, "0")  # one parameter per load_weights call
    checkpoint = emu.random_attention_checkpoint(TINY, seed=31)
    models, llm = make_engine(TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    adapter = random_adapter(TINY, [(0, "q_proj"), (0, "k_proj"), (0, "o_proj"), (1, "v_proj")], seed=32)
    sync(llm, adapter)
    check_ranks(models, TINY, 2, checkpoint, adapter, initial)
    assert all(m.load_calls == 3 for m in models)  # qkv 0, o 0, qkv 1
    monkeypatch.setenv(contract.ENV_LORA_SCRATCH_MB, "half a GiB")  # refused before any write
    with pytest.raises(ValueError, match="RFT_LORA_SCRATCH_MB='half a GiB': give a whole number of MiB"):
        sync(llm, random_adapter(TINY, [(1, "o_proj")], seed=33))  # would also drop three targets
    check_ranks(models, TINY, 2, checkpoint, adapter, initial)


class Broadcaster:
    """The model-update group's ``broadcast`` seen from a receiving worker: it fills the buffer the
    worker allocated with what trainer rank 0 sent (NCCL itself needs GPUs)."""

    def __init__(self, sent: bytes):
        self.sent = torch.frombuffer(bytearray(sent), dtype=torch.uint8)
        self.calls: list[tuple] = []

    def broadcast(self, tensor, src=0, stream=None, group_name=None):
        self.calls.append((tensor.dtype, tensor.numel(), src, group_name))
        tensor.copy_(self.sent)


@pytest.mark.parametrize("with_ray", [False, True], ids=["pynccl", "ray-collective"])
def test_nccl_receive_takes_the_buffer_from_the_model_update_group(monkeypatch, with_ray):
    """``receive="nccl"``: no bytes in the call; each worker receives ``nbytes`` from rank 0 over
    the group ``init_process_group`` made (vLLM's PyNcclCommunicator, or a ray.util.collective
    group with ``--vllm_sync_with_ray``), then merges exactly as from bytes."""
    import sys

    import ray.util

    checkpoint = emu.random_attention_checkpoint(TINY, seed=61)
    models, llm = make_engine(TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    adapter = random_adapter(TINY, [(0, "k_proj"), (1, "o_proj")], seed=62)
    spec, blob = adapter_payload(vld, adapter)
    group = Broadcaster(blob)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)  # no GPU: no stream
    collective = types.ModuleType("ray.util.collective")
    collective.broadcast = lambda tensor, src, group_name: group.broadcast(tensor, src, group_name=group_name)
    monkeypatch.setitem(sys.modules, "ray.util.collective", collective)
    monkeypatch.setattr(ray.util, "collective", collective, raising=False)
    for worker in llm.workers:
        worker._model_update_with_ray = with_ray
        worker._model_update_group = "rft-update" if with_ray else group
    evidence = asyncio.run(vld.apply_lora_update(llm, spec, None))
    assert group.calls == [(torch.uint8, len(blob), 0, "rft-update" if with_ray else None)] * 2
    assert evidence["workers"] == 2 and evidence["changed_frac"] > 0
    check_ranks(models, TINY, 2, checkpoint, adapter, initial)


# ----------------------------------------------------------------------------- refusals
def test_bad_payloads_fail_with_a_clear_error_and_write_nothing():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=41)
    models, llm = make_engine(TINY, 1, checkpoint)
    worker, before = llm.workers[0], emu.state_copy(models[0])
    spec, blob = adapter_payload(vld, random_adapter(TINY, [(0, "q_proj")], seed=42))
    with pytest.raises(ValueError, match="payload bytes"):
        worker.apply_lora_delta(spec, blob[:-64], "bytes")
    with pytest.raises(ValueError, match="payload format"):
        worker.apply_lora_delta({**spec, "format": "other/9"}, blob, "bytes")
    with pytest.raises(ValueError, match="receive='pigeon'"):
        worker.apply_lora_delta(spec, blob, "pigeon")

    def retarget(name):
        entries = [[e[0].replace("model.layers.0.self_attn.q_proj.weight", name), *e[1:]] for e in spec["entries"]]
        return {**spec, "entries": entries, "targets": [[name, 1.0]]}

    # MXFP4 experts are uint8 blocks in vLLM: a bf16 delta cannot be merged there
    with pytest.raises(ValueError, match="only float weights"):
        worker.apply_lora_delta(retarget("model.layers.0.mlp.experts.gate_up_proj"), blob, "bytes")
    with pytest.raises(ValueError, match="no parameter for this weight"):
        worker.apply_lora_delta(retarget("model.layers.0.self_attn.qq_proj.weight"), blob, "bytes")
    assert models[0].load_calls == 0
    assert_bitwise(emu.state_copy(models[0]), before)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_diverged_adapter_is_refused_before_any_weight_changes(poison):
    checkpoint = emu.random_attention_checkpoint(TINY, seed=43)
    models, llm = make_engine(TINY, 2, checkpoint)
    sync(llm, random_adapter(TINY, [(0, "q_proj"), (1, "o_proj")], seed=44))
    served = [emu.state_copy(m) for m in models]
    bad = random_adapter(TINY, [(0, "q_proj"), (1, "o_proj")], seed=45)
    bad["model.layers.1.self_attn.o_proj.weight"][1][3, 0] = poison  # B of the second target
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: .*NaN or inf"):
        sync(llm, bad)
    for model, before in zip(models, served):  # still the previous sync's weights, bit for bit
        assert_bitwise(emu.state_copy(model), before)


# ----------------------------------------------------------------------------- full weights
def test_update_weight_from_ref_loads_one_full_weight_and_rebases():
    checkpoint = emu.random_attention_checkpoint(TINY, seed=51)
    models, llm = make_engine(TINY, 2, checkpoint)
    adapter = random_adapter(TINY, [(0, "o_proj")], seed=52)
    sync(llm, adapter)
    name = "model.layers.0.self_attn.o_proj.weight"
    new_base = (torch.randn(emu.hf_attention_shape(name, TINY)) * 0.02).bfloat16()
    loaded = asyncio.run(vld.update_weight_from_ref(llm, name, torch.bfloat16, list(new_base.shape), new_base))
    assert loaded == [["model.layers.0.attn.o_proj.weight"]] * 2  # each rank names what it loaded
    rebased = dict(checkpoint, **{name: new_base})
    for r, model in enumerate(models):
        assert_bitwise(emu.state_copy(model), emu.state_copy(emu.build_rank(TINY, r, 2, rebased)))
    sync(llm, adapter)  # the delta now lands on the new base
    check_ranks(models, TINY, 2, rebased, adapter, [emu.state_copy(emu.build_rank(TINY, r, 2, rebased)) for r in range(2)])
    with pytest.raises(ValueError, match="unsupported dtype int8"):
        llm.workers[0].update_weight_from_ray_ref(name, "int8", [1], b"\x00")


# ----------------------------------------------------------------------------- settings contract
def test_the_launcher_hands_the_workers_their_settings():
    """The workers read ``RFT_LORA_PRISTINE`` and ``RFT_LORA_SCRATCH_MB`` in the engines' processes,
    which get only what the launcher puts in the Ray job's runtime_env (grpo_common.sh)."""
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "grpo_common.sh").read_text().replace("\\\n", " ")
    (call,) = [line for line in script.splitlines() if "rft_tool runtime-env" in line]
    optional = call.split("--optional", 1)[1].split(")", 1)[0].split()
    assert set(contract.LORA_SYNC_ENV_VARS) <= set(optional), optional
