"""rft.openrlhf.lora_sync: the trainer's half of the LoRA sync, without a patched tree.

A small PEFT model (checkpoint-style names ``model.layers.N.self_attn.{q,o}_proj``) stands in
for the actor; a one-rank gloo group stands in for the trainer's ranks; the engines and Ray are
recorders. Expected values come from the model's own tensors and by hand. The whole path
through the patched ``ActorPPOTrainer``, ZeRO-3, a real Ray object store and the engines'
merge runs in ``tests/test_lora_sync.py``.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import tp_emulation as emu
from rft.openrlhf import lora_sync
from rft.openrlhf.lora_sync import (
    LORA_PAYLOAD_FORMAT,
    LORA_SYNC_METRICS,
    PACK_ALIGN,
    LoraSync,
    is_lora_weight_name,
    lora_sync_metrics,
    lora_sync_tensors,
    pack_tensors,
    peft_lora_to_engine,
    share_from_rank0,
    unpack_tensors,
)
from tp_emulation import bits


# ----------------------------------------------------------------------------- payload format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_is_bitwise_exact_through_msgpack(dtype):
    tensors = emu.codec_sample_tensors(dtype)
    buffer, entries = pack_tensors(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert all(offset % PACK_ALIGN == 0 for _, _, _, offset, _ in entries)
    # crossing collective_rpc: the index stays plain lists, the buffer stays bytes
    crossed_entries, blob = emu.msgpack_roundtrip([entries, buffer.numpy().tobytes()])
    assert crossed_entries == entries
    out = unpack_tensors(torch.frombuffer(bytearray(blob), dtype=torch.uint8), crossed_entries)
    for name, tensor in tensors:
        assert out[name].dtype == dtype and out[name].shape == tensor.shape
        assert torch.equal(bits(out[name]), bits(tensor)), name


def test_unpack_rejects_a_corrupt_index():
    buffer, entries = pack_tensors([("w", torch.ones(4, 4))])
    with pytest.raises(ValueError, match="does not fit"):
        unpack_tensors(buffer, [[entries[0][0], "float32", [4, 5], entries[0][3], entries[0][4]]])
    with pytest.raises(ValueError, match="unknown dtype"):
        unpack_tensors(buffer, [["w", "int8", [4, 4], 0, 16]])
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_tensors(buffer.view(torch.float32), entries)


def test_pack_refuses_a_dtype_the_engine_cannot_read():
    with pytest.raises(ValueError, match="w has dtype int64"):
        pack_tensors([("w", torch.ones(2, dtype=torch.int64))])


# ----------------------------------------------------------------------------- names
def test_name_map_examples_and_errors():
    assert peft_lora_to_engine("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == (
        "model.layers.3.self_attn.q_proj.weight",
        "A",
        "default",
        "base_model.model.model.layers.3.self_attn.q_proj",
    )
    assert is_lora_weight_name("base_model.model.model.layers.3.self_attn.o_proj.lora_B.default.weight")
    for bad in ("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight", "x.lora_C.default.weight"):
        assert not is_lora_weight_name(bad)
        with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
            peft_lora_to_engine(bad)


class Attention(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(width, width, bias=False)
        self.o_proj = torch.nn.Linear(width, 2 * width, bias=False)


class Base(torch.nn.Module):
    """Checkpoint-style names: ``model.layers.N.self_attn.{q,o}_proj.weight``."""

    def __init__(self, layers: int = 2, width: int = 8):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.self_attn = Attention(width)
            self.model.layers.append(layer)


def peft_model(seed: int = 0, **config):
    """``Base`` with LoRA r=4, alpha=8 on q/o_proj, A and B random (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_dropout=0.0, **config)
    model = get_peft_model(Base(), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lora_weight_name(name):
                param.normal_(0, 0.1)
    return model


def lora_of(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if is_lora_weight_name(n)]


def test_peft_weights_map_to_checkpoint_names_with_the_layers_scale():
    model = peft_model()
    named, targets = lora_sync_tensors(model, lora_of(model))
    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "o_proj")]
    assert targets == [[name, 2.0] for name in names]  # alpha / r = 8 / 4
    module = dict(model.named_modules())
    for name in names:
        layer = module["base_model.model." + name.removesuffix(".weight")]
        tensors = dict(named)
        for kind, weight in (("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight)):
            assert tensors[f"{name}:{kind}"].data_ptr() == weight.data_ptr()  # the gathered weight, not a copy


def test_rslora_scale_is_the_layers_own():
    model = peft_model(use_rslora=True)
    _, targets = lora_sync_tensors(model, lora_of(model))
    assert all(scale == pytest.approx(8 / math.sqrt(4)) for _, scale in targets)


def test_adapters_that_are_not_scale_b_at_a_are_refused():
    model = peft_model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA and fan_in_fan_out"):
        lora_sync_tensors(model, lora_of(model))


def test_a_diverged_adapter_is_refused_before_anything_is_sent():
    model = peft_model()
    lora = lora_of(model)
    with torch.no_grad():
        dict(lora)["base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.o_proj\.weight:B holds NaN or inf"):
        lora_sync_tensors(model, lora)


def test_a_half_adapter_is_refused():
    model = peft_model()
    lora = [(n, p) for n, p in lora_of(model) if "layers.0.self_attn.q_proj.lora_B" not in n]
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight: lora_B is missing"):
        lora_sync_tensors(model, lora)


# ----------------------------------------------------------------------------- metrics and transport
def test_sync_metrics_by_hand():
    results = [
        {"unpack_s": 0.1, "apply_s": 0.3, "delta_norm": 2.0, "changed_frac": 0.5, "target_norm": 10.0},
        {"unpack_s": 0.2, "apply_s": 0.25, "delta_norm": 4.0, "changed_frac": 0.7, "target_norm": 12.0},
    ]
    out = lora_sync_metrics(results, gather_s=0.01, pack_s=0.02, remote_s=1.0, total_s=1.03)
    assert list(out) == list(LORA_SYNC_METRICS)
    assert out == pytest.approx({
        "sync_seconds": 1.03, "sync_delta_norm": 3.0, "sync_changed_frac": 0.6, "sync_target_norm": 11.0,
        "sync_gather_s": 0.01, "sync_pack_s": 0.02,
        "sync_transfer_s": 1.0 - 0.2 - 0.3,  # the round trip less the slowest unpack and the slowest apply
        "sync_unpack_s": 0.2, "sync_apply_s": 0.3,
    })
    assert lora_sync_metrics(results, 0.0, 0.0, remote_s=0.1, total_s=0.1)["sync_transfer_s"] == 0.0


# (lora_rank, vllm_sync_with_ray, use_cuda_ipc): None without LoRA, else whether the object store carries it
TRANSPORTS = {(0, False, False): None, (0, True, True): None, (8, False, False): False, (8, True, False): True,
              (8, False, True): True}


@pytest.mark.parametrize("mode", list(TRANSPORTS))
def test_transport_of_each_mode(mode):
    lora_rank, with_ray, cuda_ipc = mode
    sync = LoraSync.for_run(types.SimpleNamespace(lora_rank=lora_rank, vllm_sync_with_ray=with_ray), cuda_ipc)
    assert (None if sync is None else sync.via_object_store) == TRANSPORTS[mode]


# ----------------------------------------------------------------------------- the sync on one rank
@pytest.fixture
def one_rank(tmp_path):
    """torch.distributed with one gloo rank: rank 0, whose metrics broadcast is a real collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


ENGINE_RESULT = {"unpack_s": 0.0, "apply_s": 0.0, "delta_norm": 1.5, "changed_frac": 0.25, "target_norm": 6.0}


class Engines:
    """Engine handles whose ``apply_lora_update.remote`` records its arguments; Ray's put/get as recorders."""

    def __init__(self, count: int, fail: bool = False):
        self.calls: list = []
        self.puts: list = []
        self.fail = fail
        self.handles = [types.SimpleNamespace(apply_lora_update=types.SimpleNamespace(remote=self._remote))
                        for _ in range(count)]

    def _remote(self, spec, payload):
        self.calls.append((spec, payload))
        return len(self.calls) - 1

    def ray(self):
        def put(value):
            self.puts.append(value)
            return f"ref{len(self.puts)}"

        def get(refs):
            if self.fail:
                raise RuntimeError("engine 1: no parameter for this weight")
            return [dict(ENGINE_RESULT) for _ in refs]

        return types.SimpleNamespace(put=put, get=get)


ARGS = types.SimpleNamespace(zero_stage=0, ds_tensor_parallel_size=1)


def check_payload(model, spec, buffer: torch.Tensor) -> None:
    """The buffer holds every LoRA matrix of ``model``, bit for bit, under its checkpoint name."""
    assert spec["format"] == LORA_PAYLOAD_FORMAT and spec["nbytes"] == buffer.numel()
    got = unpack_tensors(buffer, spec["entries"])
    want = {}
    for name, param in lora_of(model):
        engine_name, kind, _, _ = peft_lora_to_engine(name)
        want[f"{engine_name}:{kind}"] = param.detach()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(bits(got[key]), bits(want[key])), key
    assert [scale for _, scale in spec["targets"]] == [2.0] * 4


def test_object_store_sync_puts_one_buffer_for_all_engines(one_rank, monkeypatch):
    model, engines = peft_model(seed=3), Engines(2)
    monkeypatch.setattr(lora_sync, "ray", engines.ray())
    metrics = LoraSync(via_object_store=True).broadcast(model, ARGS, engines.handles)
    assert len(engines.puts) == 1 and [payload for _, payload in engines.calls] == ["ref1", "ref1"]
    spec = engines.calls[0][0]
    assert engines.calls[1][0] is spec
    check_payload(model, spec, torch.from_numpy(engines.puts[0]))
    assert list(metrics) == list(LORA_SYNC_METRICS) and all(isinstance(v, float) for v in metrics.values())
    assert (metrics["sync_delta_norm"], metrics["sync_changed_frac"], metrics["sync_target_norm"]) == (1.5, 0.25, 6.0)
    assert 0 <= metrics["sync_gather_s"] + metrics["sync_pack_s"] + metrics["sync_transfer_s"] <= metrics["sync_seconds"]


def test_nccl_sync_fires_the_engines_then_broadcasts_the_buffer_once(one_rank, monkeypatch):
    model, engines = peft_model(seed=4), Engines(2)
    order: list = []

    def broadcast(tensor, src, stream):
        order.append((len(engines.calls), tensor.clone(), src))

    group = types.SimpleNamespace(broadcast=broadcast)
    monkeypatch.setattr(lora_sync, "ray", engines.ray())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)  # no GPU: no stream
    LoraSync(via_object_store=False).broadcast(model, ARGS, engines.handles, group)
    assert engines.puts == [] and [payload for _, payload in engines.calls] == [None, None]
    ((fired, buffer, src),) = order
    assert fired == 2 and src == 0  # both engines wait for the broadcast before it is sent
    check_payload(model, engines.calls[0][0], buffer)


def test_a_failure_on_rank_0_is_raised_after_the_metrics_broadcast(one_rank, monkeypatch):
    """The other ranks wait in the metrics broadcast: rank 0 must reach it before raising."""
    import torch.distributed as dist

    engines = Engines(1, fail=True)
    monkeypatch.setattr(lora_sync, "ray", engines.ray())
    broadcasts = []
    real = dist.broadcast
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: broadcasts.append(tensor.tolist()) or real(tensor, src))
    with pytest.raises(RuntimeError, match="no parameter for this weight"):
        LoraSync(via_object_store=True).broadcast(peft_model(), ARGS, engines.handles)
    assert len(broadcasts) == 1 and broadcasts[0][-1] == 1.0  # the failure flag went out to every rank


def test_the_other_ranks_raise_when_rank_0_failed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(lora_sync, "share_from_rank0", lambda metrics, failed: None)  # rank 0 said: failed
    with pytest.raises(RuntimeError, match="failed on rank 0"):
        LoraSync(via_object_store=True).broadcast(peft_model(), ARGS, [])


def test_share_from_rank0_carries_the_metrics_or_the_failure(one_rank):
    metrics = {key: float(i) / 8 for i, key in enumerate(LORA_SYNC_METRICS)}
    assert share_from_rank0(metrics, failed=False) == metrics
    assert share_from_rank0(metrics, failed=True) is None


def test_a_model_without_lora_weights_is_refused():
    with pytest.raises(RuntimeError, match="--lora_rank > 0 but the actor has no lora_A/lora_B weights"):
        LoraSync(via_object_store=True).broadcast(Base(), ARGS, [])


@pytest.mark.gpu
def test_the_pinned_staging_buffer_is_reused_across_syncs():
    sync = LoraSync(via_object_store=True)
    first = sync.stage(torch.arange(256, dtype=torch.uint8, device="cuda"))
    second = sync.stage(torch.full((256,), 7, dtype=torch.uint8, device="cuda"))
    assert second.data_ptr() == first.data_ptr() and second.is_pinned()
    assert torch.equal(second, torch.full((256,), 7, dtype=torch.uint8))
