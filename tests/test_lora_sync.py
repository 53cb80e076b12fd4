"""LoRA-delta weight sync to vLLM (patches ppo_actor, vllm_engine, vllm_worker).

Everything runs the real patched OpenRLHF modules. Only vLLM's import boundary is
stubbed (the ``vllm_stub`` fixture), and vLLM's gpt-oss weight loading is replaced
by the tensor-parallel emulation of ``tests/tp_emulation.py``, which slices
exactly as vLLM 0.15.1's ``QKVParallelLinear``/``RowParallelLinear`` loaders do.
The engine's ``collective_rpc`` arguments cross a msgpack round trip (and a
pickle per worker for TP > 1), as they do in vLLM.

What the groups prove:
* worker: the methods ``vllm_worker.patch`` adds do not collide with vLLM's Worker;
* names: every attention LoRA weight of a PEFT gpt-oss model maps to a base
  checkpoint name and to the fused vLLM parameter it lands in;
* TP merge: the patched engine and worker reach ``rft.openrlhf.vllm_lora_delta`` and
  merge exactly at TP 2 (the merge itself, the payload's crossing and every refusal are
  unit-tested in ``tests/test_hook_vllm_lora_delta.py``, at TP 1, 2 and 4);
* trainer side: the patched ``broadcast_to_vllm`` (``rft.openrlhf.lora_sync``) gathers, packs and ships one
  buffer through a real local Ray object store into emulated engines, and over the
  model-update group (its broadcast emulated in process) into workers that receive it
  with ``receive="nccl"``;
* transport modes: the real ``ActorPPOTrainer.__init__`` joins the group 0.9.3 joins without
  LoRA in every mode, and with LoRA picks the NCCL group or the object store (then creating
  no group) as docs/weight_sync.md says; CUDA work is synchronized before a group init;
* GPU (marked ``gpu``): the same merge checks at gpt-oss-20b attention shapes.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import oprl
import tp_emulation as emu
from rft.openrlhf import lora_sync, native_lora
from rft.openrlhf import vllm_lora_delta
from tp_emulation import adapter_payload, assert_bitwise, bits, merged_checkpoint, random_adapter

TINY = {"layers": 2, "hidden": 64, "heads": 8, "kv_heads": 2, "head_dim": 8}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def wrap(patched_root, vllm_stub):
    """The patched ``openrlhf.trainer.ray.vllm_worker_wrap`` module."""
    return oprl.load(patched_root, "openrlhf.trainer.ray.vllm_worker_wrap")


@pytest.fixture
def engine_mod(patched_root, vllm_stub):
    """The patched ``openrlhf.trainer.ray.vllm_engine`` module."""
    return oprl.load(patched_root, "openrlhf.trainer.ray.vllm_engine")


def engine_call(engine_mod, method: str, llm, *args, engine_kwargs=None):
    """Run a method of the patched ``LLMRayActor`` (the class behind ``@ray.remote``) on ``llm``.

    The actor's native-LoRA state is built as its patched ``__init__`` builds it from the engine's
    arguments: ``engine_kwargs`` None is an engine started without LoRA (the merged sync)."""
    fn = getattr(engine_mod.LLMRayActor.__ray_metadata__.modified_class, method)
    actor = types.SimpleNamespace(llm=llm, native_lora=native_lora.NativeLoraEngine.for_engine(engine_kwargs or {}))
    return asyncio.run(fn(actor, *args))


def make_ranks(wrap, geo, tp, checkpoint, device="cpu"):
    models = [emu.build_rank(geo, r, tp, checkpoint, device=device) for r in range(tp)]
    workers = [emu.make_worker(wrap.WorkerWrap, m, device) for m in models]
    return models, workers


# ----------------------------------------------------------------------------- worker
def test_worker_method_names_do_not_collide_with_vllm_worker(wrap):
    # Class attributes of vLLM 0.15.1's Worker and WorkerBase (v1/worker/gpu_worker.py,
    # worker_base.py); vLLM asserts that the extension class adds none of them.
    vllm_worker_attrs = {
        "add_lora", "apply_model", "check_health", "compile_or_warm_up_model", "determine_available_memory",
        "execute_dummy_batch", "execute_model", "get_cache_block_size_bytes", "get_kv_cache_spec", "get_model",
        "get_supported_tasks", "init_device", "initialize_cache", "initialize_from_config", "list_loras",
        "load_model", "pin_lora", "profile", "reload_weights", "remove_lora", "reset_mm_cache", "sample_tokens",
        "save_sharded_state", "save_tensorized_model", "shutdown", "sleep", "take_draft_token_ids",
        "update_config", "update_max_model_len", "wake_up", "device", "model_runner", "model_config",
    }
    added = {name for name in vars(wrap.WorkerWrap) if not name.startswith("__")}
    assert {"apply_lora_delta", "update_weight_from_ray_ref"} <= added
    assert not added & vllm_worker_attrs


@pytest.mark.parametrize("variant", ["pristine", "patched"])
def test_policy_actor_returns_the_sync_metrics(request, vllm_stub, variant):
    """The trainer logs what PolicyModelActor.broadcast_to_vllm returns; 0.9.3 returns nothing."""
    ppo_actor = oprl.load(request.getfixturevalue(f"{variant}_root"), "openrlhf.trainer.ray.ppo_actor")
    actor_cls = ppo_actor.PolicyModelActor.__ray_metadata__.modified_class
    metrics = {"sync_seconds": 0.25}
    fake = types.SimpleNamespace(trainer=types.SimpleNamespace(broadcast_to_vllm=lambda: metrics))
    returned = actor_cls.broadcast_to_vllm(fake)
    assert (returned is metrics) == (variant == "patched")
    assert hasattr(ppo_actor, "LoraSync") == (variant == "patched")  # the sync itself: rft.openrlhf.lora_sync


# ----------------------------------------------------------------------------- transport modes
class InitRecorder:
    """What ``ActorPPOTrainer.__init__`` does towards the engines: CUDA syncs, engine calls, groups.

    Stands in for the GPU and Ray calls of the weight-sync setup (one trainer rank, rank 0);
    the real ``__init__`` of the module under test decides which of them to make.
    """

    def __init__(self):
        self.events: list[str] = []

    def engine(self):
        recorder = self

        def init_process_group(*args, use_ray=False, **kwargs):
            recorder.events.append(f"engine.init_process_group(use_ray={use_ray})")
            return "ref"

        return types.SimpleNamespace(init_process_group=types.SimpleNamespace(remote=init_process_group))


# (lora_rank, colocate_all_models, vllm_sync_with_ray, async_train): the group rank 0 joins and
# whether the adapter goes through the object store; 0.9.3's choice without LoRA stays as it was
SYNC_MODES = {
    (0, False, False, False): ("pynccl", False),
    (0, False, True, False): ("ray.util.collective", False),
    (0, True, False, False): (None, False),  # CUDA IPC: no group
    (8, False, False, False): ("pynccl", False),  # packed buffer over the NCCL group
    (8, False, True, False): (None, True),  # object store: no ray.util.collective group
    (8, True, False, False): (None, True),  # colocated: CUDA IPC has no group, object store
    (8, True, False, True): ("pynccl", False),  # async colocated: 0.9.3 takes NCCL, so does LoRA
}


@pytest.mark.parametrize("variant", ["pristine", "patched"])
@pytest.mark.parametrize("mode", list(SYNC_MODES), ids=lambda m: "lora{}-colocate{:d}-ray{:d}-async{:d}".format(*m))
def test_trainer_init_picks_the_transport_of_each_mode(request, vllm_stub, monkeypatch, variant, mode):
    """The real ``ActorPPOTrainer.__init__``: which group rank 0 joins, and the LoRA transport."""
    import sys

    from fixtures import metrics_fakes as fk

    lora_rank, colocate, with_ray, async_train = mode
    ppo_actor = oprl.load(request.getfixturevalue(f"{variant}_root"), "openrlhf.trainer.ray.ppo_actor")
    rec = InitRecorder()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: rec.events.append("cuda.synchronize"))
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    monkeypatch.setattr(
        ppo_actor, "stateless_init_process_group", lambda *a, **k: rec.events.append("group:pynccl") or "pynccl"
    )
    fake_ray = types.SimpleNamespace(
        get=lambda refs: refs,
        _private=types.SimpleNamespace(services=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")),
    )
    monkeypatch.setattr(ppo_actor, "ray", fake_ray)
    collective = types.ModuleType("ray.util.collective")
    collective.init_collective_group = lambda **kw: rec.events.append("group:ray.util.collective")
    monkeypatch.setitem(sys.modules, "ray.util.collective", collective)
    import ray.util

    monkeypatch.setattr(ray.util, "collective", collective, raising=False)

    args = fk.make_args(
        lora_rank=lora_rank, colocate_all_models=colocate, vllm_sync_with_ray=with_ray, async_train=async_train,
        vllm_sync_backend="nccl", vllm_num_engines=2, vllm_tensor_parallel_size=2,
    )
    strategy = types.SimpleNamespace(args=args)
    trainer = ppo_actor.ActorPPOTrainer(strategy, None, None, None, None, vllm_engines=[rec.engine(), rec.engine()])

    group, object_store = SYNC_MODES[mode]
    groups = [e.removeprefix("group:") for e in rec.events if e.startswith("group:")]
    if variant == "patched":
        assert groups == ([group] if group else [])
        assert (trainer.lora_sync is not None) == (lora_rank > 0)
        assert (trainer.lora_sync is not None and trainer.lora_sync.via_object_store) == object_store
        if group:  # kernels finish before the group init, and the engines join the same group
            assert rec.events[0] == "cuda.synchronize"
            assert rec.events.count(f"engine.init_process_group(use_ray={with_ray})") == 2
        else:
            assert not [e for e in rec.events if e.startswith("engine.")]
    else:  # 0.9.3 ignores --lora_rank here: the full-weight choice in every mode
        pristine_group = None if (colocate and not async_train) else ("ray.util.collective" if with_ray else "pynccl")
        assert groups == ([pristine_group] if pristine_group else [])
        assert "cuda.synchronize" not in rec.events and not hasattr(trainer, "lora_sync")


# ----------------------------------------------------------------------------- names
def tiny_peft_gpt_oss(target_modules):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128, hidden_size=64,
        intermediate_size=64, head_dim=8, num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
        max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    base = GptOssForCausalLM(config)
    checkpoint_names = set(base.state_dict())  # what vLLM's load_weights is fed from disk
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, bias="none")
    return get_peft_model(base, lora), checkpoint_names


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
def test_peft_names_map_onto_the_engine(patched_root, vllm_stub, wrap, targets):
    peft_model, base_names = tiny_peft_gpt_oss(targets)
    lora = [(n, p) for n, p in peft_model.named_parameters() if lora_sync.is_lora_weight_name(n)]
    assert len(lora) == 2 * 4 * 2  # A and B, 4 projections, 2 layers: gpt-oss's only nn.Linear layers

    named, targets_out = lora_sync.lora_sync_tensors(peft_model, lora)
    engine_names = [name for name, _ in targets_out]
    assert len(engine_names) == 8 and set(engine_names) <= base_names
    assert all(math.isclose(scale, 8 / 4) for _, scale in targets_out)
    assert {name for name, _ in named} == {f"{n}:{k}" for n in engine_names for k in "AB"}

    served = emu.GptOssForCausalLM(TINY)
    params = dict(served.named_parameters())
    landed = {vllm_lora_delta.resolve_vllm_param(served, name, params) for name in engine_names}
    assert landed == {f"model.layers.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv_proj", "o_proj")}

    with torch.no_grad():  # a diverged adapter is refused before anything is sent
        dict(lora)["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.weight:B holds NaN"):
        lora_sync.lora_sync_tensors(peft_model, lora)


def test_pristine_sync_sends_names_vllm_rejects():
    """Why the map exists: vLLM's loader raises on the PEFT names 0.9.3 sends verbatim."""
    served = emu.GptOssForCausalLM(TINY)
    with pytest.raises(ValueError, match="no module or parameter named 'base_model'"):
        served.load_weights([("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", torch.zeros(4, 64))])


# ----------------------------------------------------------------------------- TP merge
def check_ranks(models, geo, tp, checkpoint, adapter, initial, device="cpu"):
    """Every rank equals the shard of bf16(W0 + delta); untouched entries equal W0 bitwise."""
    reference = merged_checkpoint(checkpoint, adapter)
    for r, model in enumerate(models):
        want = emu.state_copy(emu.build_rank(geo, r, tp, reference, device=device))
        got = emu.state_copy(model)
        assert_bitwise(got, want)
        for name, value in initial[r].items():  # what the adapter cannot touch is W0, bit for bit
            if not name.endswith(("qkv_proj.weight", "o_proj.weight")):
                assert torch.equal(bits(got[name]), bits(value)), name


def test_patched_engine_and_worker_reach_the_hooks(wrap, engine_mod):
    """The patched ``LLMRayActor`` and ``WorkerWrap`` run ``rft.openrlhf.vllm_lora_delta`` (whose merge
    ``tests/test_hook_vllm_lora_delta.py`` checks in depth): at TP 2 two syncs land exactly, a full weight
    from the object store becomes the new base, and a worker's refusal reaches the engine's caller."""
    checkpoint = emu.random_attention_checkpoint(TINY, seed=7)
    models, workers = make_ranks(wrap, TINY, 2, checkpoint)
    initial = [emu.state_copy(m) for m in models]
    llm = emu.EmulatedAsyncLLM(workers)
    adapter = random_adapter(TINY, [(0, "q_proj"), (1, "o_proj")], seed=11)
    for _ in range(2):
        evidence = engine_call(engine_mod, "apply_lora_update", llm, *adapter_payload(vllm_lora_delta, adapter))
    check_ranks(models, TINY, 2, checkpoint, adapter, initial)
    assert llm.calls == ["apply_lora_delta"] * 2 and llm.prefix_cache_resets == 2
    assert evidence["workers"] == 2 and 0 < evidence["changed_frac"] < 1

    name = "model.layers.1.self_attn.o_proj.weight"
    new_base = (torch.randn(emu.hf_attention_shape(name, TINY)) * 0.02).bfloat16()
    engine_call(engine_mod, "update_weight_from_ref", llm, name, torch.bfloat16, list(new_base.shape), new_base)
    engine_call(engine_mod, "apply_lora_update", llm, *adapter_payload(vllm_lora_delta, adapter))
    rebased = dict(checkpoint, **{name: new_base})
    check_ranks(models, TINY, 2, rebased, adapter, [emu.state_copy(emu.build_rank(TINY, r, 2, rebased)) for r in range(2)])

    spec, blob = adapter_payload(vllm_lora_delta, adapter)
    with pytest.raises(ValueError, match="payload format"):
        engine_call(engine_mod, "apply_lora_update", llm, {**spec, "format": "other/9"}, blob)


def test_emulated_loader_slices_like_vllm():
    """The emulation itself, checked against hand-computed vLLM offsets (TP=2, 8 q / 2 kv heads)."""
    checkpoint = emu.random_attention_checkpoint(TINY, seed=61)
    d = TINY["head_dim"]
    for r in range(2):
        model = emu.build_rank(TINY, r, 2, checkpoint)
        qkv = model.get_parameter("model.layers.1.attn.qkv_proj.weight")
        q = checkpoint["model.layers.1.self_attn.q_proj.weight"][r * 4 * d : (r + 1) * 4 * d]
        k = checkpoint["model.layers.1.self_attn.k_proj.weight"][r * d : (r + 1) * d]
        v = checkpoint["model.layers.1.self_attn.v_proj.weight"][r * d : (r + 1) * d]
        assert torch.equal(qkv, torch.cat([q, k, v]))
        o = checkpoint["model.layers.1.self_attn.o_proj.weight"][:, r * 4 * d : (r + 1) * 4 * d]
        assert torch.equal(model.get_parameter("model.layers.1.attn.o_proj.weight"), o)
        assert torch.equal(model.get_parameter("model.layers.1.attn.o_proj.bias"), checkpoint["model.layers.1.self_attn.o_proj.bias"])


# ----------------------------------------------------------------------------- trainer side
@pytest.fixture
def local_ray(patched_root):
    """A real local Ray instance whose workers can import tests/ and the patched tree."""
    import os

    ray = pytest.importorskip("ray")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([str(patched_root), tests_dir, os.path.dirname(tests_dir)])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture
def single_rank_group(tmp_path):
    """torch.distributed with one rank: NCCL on a GPU machine (as in training), else gloo."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def zero3_peft_gpt_oss(monkeypatch, seed=71):
    """A bf16 PEFT gpt-oss (LoRA on q/k/v/o, random A and B) partitioned in place by ZeRO-3.

    Returns ``(peft_model, checkpoint, adapter)``: the base attention tensors by checkpoint
    name and ``{hf_name: (A, B, scale)}``, both copied before partitioning.
    """
    import deepspeed

    peft_model, _ = tiny_peft_gpt_oss(["q_proj", "k_proj", "v_proj", "o_proj"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peft_model = peft_model.to(device, torch.bfloat16)  # the actor trains in bf16: the payload is bf16
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if lora_sync.is_lora_weight_name(name):
                param.copy_((torch.randn(param.shape, generator=gen) * 0.05).to(param.device))
    base = peft_model.get_base_model()
    checkpoint = {
        name.replace(".base_layer", ""): tensor.detach().cpu().clone()
        for name, tensor in base.state_dict().items()
        if ".self_attn." in name and "lora_" not in name
    }
    adapter = {}
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            hf_name = module_name.removeprefix("base_model.model.") + ".weight"
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            adapter[hf_name] = (lora_a.detach().cpu().clone(), lora_b.detach().cpu().clone(), module.scaling["default"])
    monkeypatch.setenv("LOCAL_RANK", "0")
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}
    deepspeed.zero.Init(module=peft_model, config_dict_or_path=zero3, dtype=torch.bfloat16)  # partition in place
    assert all(p.numel() == 0 for n, p in peft_model.named_parameters() if lora_sync.is_lora_weight_name(n))
    return peft_model, checkpoint, adapter


@pytest.mark.slow
def test_trainer_ships_one_packed_buffer_through_the_object_store(
    patched_root, vllm_stub, local_ray, single_rank_group, monkeypatch
):
    """The real ``broadcast_to_vllm`` of a ZeRO-3-partitioned PEFT gpt-oss (one rank), real Ray.

    On a GPU machine the model, the gather and the packing run on CUDA with NCCL (and the
    buffer is staged in pinned memory); elsewhere on CPU with gloo.
    """
    ppo_actor = oprl.load(patched_root, "openrlhf.trainer.ray.ppo_actor")
    peft_model, checkpoint, adapter = zero3_peft_gpt_oss(monkeypatch)

    harness = local_ray.remote(emu.EngineHarness)
    engines = [harness.remote(str(patched_root), TINY, tp, checkpoint) for tp in (2, 1)]

    args = types.SimpleNamespace(zero_stage=3, ds_tensor_parallel_size=1, vllm_sync_with_ray=True, lora_rank=4)
    trainer = ppo_actor.ActorPPOTrainer.__new__(ppo_actor.ActorPPOTrainer)
    trainer.strategy, trainer.args, trainer.vllm_engines = types.SimpleNamespace(args=args), args, engines
    trainer.actor = types.SimpleNamespace(model=types.SimpleNamespace(module=peft_model))
    trainer.lora_sync = lora_sync.LoraSync.for_run(args, use_cuda_ipc=False)  # --vllm_sync_with_ray: the object store

    # Known stages for the timers to measure: packing takes pack_sleep longer and the object-store
    # put (part of the transfer) put_sleep longer; the test's own clock marks when packing began and
    # when the engines' results came back, a span the sync's total must cover.
    pack_sleep, put_sleep = 0.1, 0.4
    marks = {}
    real_pack, real_put, real_get = lora_sync.LoraSync.pack, lora_sync.ray.put, lora_sync.ray.get

    def timed_pack(self, *args, **kwargs):
        marks["pack_start"] = time.perf_counter()
        time.sleep(pack_sleep)
        return real_pack(self, *args, **kwargs)

    def slow_put(*args, **kwargs):
        time.sleep(put_sleep)
        return real_put(*args, **kwargs)

    def timed_get(*args, **kwargs):
        results = real_get(*args, **kwargs)
        marks["results_back"] = time.perf_counter()
        return results

    monkeypatch.setattr(lora_sync.LoraSync, "pack", timed_pack)
    monkeypatch.setattr(lora_sync.ray, "put", slow_put)
    monkeypatch.setattr(lora_sync.ray, "get", timed_get)

    started = time.perf_counter()
    metrics = trainer.broadcast_to_vllm()
    wall = time.perf_counter() - started
    assert set(metrics) == set(lora_sync.LORA_SYNC_METRICS) and all(isinstance(v, float) for v in metrics.values())
    assert metrics["sync_delta_norm"] > 0 and 0 < metrics["sync_changed_frac"] <= 1
    # each stage holds its own sleep and not the other's; the total covers packing to results, within the call
    assert pack_sleep <= metrics["sync_pack_s"] < put_sleep
    assert put_sleep <= metrics["sync_transfer_s"]
    assert marks["results_back"] - marks["pack_start"] <= metrics["sync_seconds"] <= wall

    reference = merged_checkpoint(checkpoint, adapter, torch.bfloat16)
    for tp, engine in zip((2, 1), engines):
        for r, state in enumerate(local_ray.get(engine.states.remote())):
            want = emu.state_copy(emu.build_rank(TINY, r, tp, reference))
            assert_bitwise(state, want, [n for n in want if ".attn." in n])

    # an engine that cannot take the adapter (it serves one layer, the adapter has two):
    # the failure reaches the trainer as an exception, after the metrics broadcast (no hang)
    one_layer = {n: t for n, t in checkpoint.items() if n.startswith("model.layers.0.")}
    trainer.vllm_engines = [harness.remote(str(patched_root), dict(TINY, layers=1), 1, one_layer)]
    with pytest.raises(Exception, match="no parameter for this weight"):
        trainer.broadcast_to_vllm()


class ModelUpdateGroup:
    """The model-update group's ``broadcast`` (vLLM's PyNcclCommunicator API) inside one process.

    Trainer rank 0 broadcasts first (its engine calls are deferred until ``ray.get``); each
    worker's receive then copies what was sent into the buffer it allocated. Only NCCL itself is
    replaced: the sizes, dtypes and order of the calls are the patched code's own.
    """

    def __init__(self):
        self.sent: torch.Tensor | None = None
        self.receives = 0

    def broadcast(self, tensor, src=0, stream=None):
        assert src == 0 and tensor.dtype == torch.uint8 and tensor.dim() == 1
        if self.sent is None:
            self.sent = tensor.detach().cpu().clone()
        else:
            assert tensor.numel() == self.sent.numel(), "receiver allocated a buffer of another size"
            tensor.copy_(self.sent)
            self.receives += 1


def test_trainer_ships_one_packed_buffer_over_the_model_update_group(
    patched_root, vllm_stub, wrap, engine_mod, single_rank_group, monkeypatch
):
    """The NCCL transport (no --vllm_sync_with_ray, not colocated): rank 0 fires the engines'
    ``apply_lora_update(spec, None)``, broadcasts the packed buffer once on the model-update
    group, and every TP worker receives it with ``receive="nccl"`` and merges it exactly."""
    ppo_actor = oprl.load(patched_root, "openrlhf.trainer.ray.ppo_actor")
    peft_model, checkpoint, adapter = zero3_peft_gpt_oss(monkeypatch, seed=72)
    group = ModelUpdateGroup()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)  # no GPU: no stream
    engines, llms, models = [], [], []
    for tp in (2, 1):
        ranks, workers = make_ranks(wrap, TINY, tp, checkpoint)
        for worker in workers:
            worker._model_update_group = group
        llm = emu.EmulatedAsyncLLM(workers)

        def apply_lora_update(spec, payload, llm=llm):
            assert payload is None  # the bytes come over the group, not as an argument
            return lambda: engine_call(engine_mod, "apply_lora_update", llm, spec, payload)

        engines.append(types.SimpleNamespace(apply_lora_update=types.SimpleNamespace(remote=apply_lora_update)))
        llms.append(llm)
        models.append((tp, ranks))
    monkeypatch.setattr(lora_sync, "ray", types.SimpleNamespace(get=lambda refs: [ref() for ref in refs]))

    args = types.SimpleNamespace(zero_stage=3, ds_tensor_parallel_size=1, vllm_sync_with_ray=False, lora_rank=4)
    trainer = ppo_actor.ActorPPOTrainer.__new__(ppo_actor.ActorPPOTrainer)
    trainer.strategy, trainer.args, trainer.vllm_engines = types.SimpleNamespace(args=args), args, engines
    trainer.actor = types.SimpleNamespace(model=types.SimpleNamespace(module=peft_model))
    trainer.lora_sync, trainer._model_update_group = lora_sync.LoraSync.for_run(args, use_cuda_ipc=False), group

    metrics = trainer.broadcast_to_vllm()
    assert set(metrics) == set(lora_sync.LORA_SYNC_METRICS) and metrics["sync_changed_frac"] > 0
    assert group.receives == 3  # one send, one receive per TP worker of both engines
    assert [llm.calls for llm in llms] == [["apply_lora_delta"]] * 2 and all(llm.prefix_cache_resets == 1 for llm in llms)
    reference = merged_checkpoint(checkpoint, adapter, torch.bfloat16)
    for tp, ranks in models:
        for r, model in enumerate(ranks):
            want = emu.state_copy(emu.build_rank(TINY, r, tp, reference))
            assert_bitwise(emu.state_copy(model), want, [n for n in want if ".attn." in n])


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_gpu_merge_at_gpt_oss_20b_shapes(wrap, engine_mod, tp):
    geo = emu.GPT_OSS_SHAPES["gpt-oss-20b"]
    checkpoint = emu.random_attention_checkpoint(geo, device="cuda", seed=tp)
    models, workers = make_ranks(wrap, geo, tp, checkpoint, device="cuda")
    initial = [emu.state_copy(m) for m in models]
    llm = emu.EmulatedAsyncLLM(workers)
    targets = [(i, p) for i in range(geo["layers"]) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    zero = {n: (a, torch.zeros_like(b), s) for n, (a, b, s) in random_adapter(geo, targets, rank=32, device="cuda").items()}
    engine_call(engine_mod, "apply_lora_update", llm, *adapter_payload(vllm_lora_delta, zero))
    for model, before in zip(models, initial):
        assert_bitwise(emu.state_copy(model), before)
    for step in (1, 2, 3):
        adapter = random_adapter(geo, targets, rank=32, seed=step, magnitude=0.1, device="cuda")
        evidence = engine_call(engine_mod, "apply_lora_update", llm, *adapter_payload(vllm_lora_delta, adapter))
    check_ranks(models, geo, tp, checkpoint, adapter, initial, device="cuda")
    assert 0 < evidence["changed_frac"] <= 1


def test_gpu_lane_collects_this_files_gpu_tests():
    """tests/gpu/run_gpu_lane.sh runs pytest with -m gpu over the paths of its GPU_TESTS array: every
    GPU test of this file must be among the tests that command collects."""
    import subprocess
    import sys

    lane = oprl.REPO / "tests" / "gpu" / "run_gpu_lane.sh"
    (assignment,) = [line for line in lane.read_text().splitlines() if line.startswith("GPU_TESTS=(")]
    paths = subprocess.run(["bash", "-c", assignment + '; printf "%s\\n" "${GPU_TESTS[@]}"'],
                           capture_output=True, text=True, check=True).stdout.split()
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                *paths], capture_output=True, text=True, cwd=oprl.REPO, timeout=300).stdout.splitlines()
    gpu_tests = [name for name, value in globals().items() if name.startswith("test_")
                 and any(mark.name == "gpu" for mark in getattr(value, "pytestmark", []))]
    assert "test_gpu_merge_at_gpt_oss_20b_shapes" in gpu_tests
    for name in gpu_tests:
        assert any(line.startswith(f"tests/test_lora_sync.py::{name}[") for line in collected), (paths, collected[-5:])


# ----------------------------------------------------------------------------- benchmark
def load_bench():
    import importlib.util

    path = oprl.REPO / "bench" / "bench_lora_sync.py"
    spec = importlib.util.spec_from_file_location("bench_lora_sync", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_the_shipped_worker_code(patched_root, pristine_root):
    """The benchmark loads vllm_worker_wrap.py of the tree it is given, and refuses it unpatched in one line."""
    bench = load_bench()
    worker_file = Path("openrlhf") / "trainer" / "ray" / "vllm_worker_wrap.py"
    loaded = bench.load_worker_module(patched_root)
    assert Path(loaded.__file__) == patched_root / worker_file and hasattr(loaded.WorkerWrap, "apply_lora_delta")
    with pytest.raises(SystemExit) as refused:
        bench.load_worker_module(pristine_root)
    message = str(refused.value)
    assert "\n" not in message and str(pristine_root / worker_file) in message
    assert "apply_patches.sh" in message and "--openrlhf-root" in message and "--export" in message


@pytest.mark.slow
def test_bench_smoke_reports_exact_merges(tmp_path, monkeypatch, patched_root):
    bench = load_bench()
    out = tmp_path / "sync.json"
    argv = ["--models", "gpt-oss-20b", "--ranks", "4", "--layers", "1", "--repeats", "1", "--transport", "inproc",
            "--json-out", str(out), "--openrlhf-root", str(patched_root)]
    # the transport of every sync takes a known extra time, which the figures must show
    transfer_sleep = 0.3
    real_call = bench.InProcessTransport.__call__
    monkeypatch.setattr(bench.InProcessTransport, "__call__",
                        lambda self, *args: (time.sleep(transfer_sleep), real_call(self, *args))[1])
    started = time.monotonic()
    assert bench.main(argv) == 0
    wall = time.monotonic() - started
    import json

    result = json.loads(out.read_text())["results"][0]
    assert result["exact"] is True and result["n_tensors"] == 8 and result["tp"] == 2
    assert transfer_sleep <= result["transfer_s"] and result["pack_s"] < transfer_sleep
    # two syncs ran (a first and one steady one): the steady sync's total holds the sleep, within main's time
    assert transfer_sleep <= result["total_s"] <= wall - transfer_sleep
    assert (tmp_path / "sync.png").exists()


# ----------------------------------------------------------------------------- native or merged, per run
class _RecordingActor:
    """Stands in for ``LLMRayActor`` behind Ray: records the arguments each engine is created with."""

    def __init__(self):
        self.created: list[dict] = []

    def options(self, **_):
        return self

    def remote(self, **kwargs):
        self.created.append(kwargs)
        return kwargs


def _create_engines(engine_mod, monkeypatch, lora_rank: int) -> list[dict]:
    actor = _RecordingActor()
    monkeypatch.setattr(engine_mod, "LLMRayActor", actor)
    monkeypatch.setattr(engine_mod, "placement_group", lambda bundles, strategy: types.SimpleNamespace(ready=lambda: None))
    monkeypatch.setattr(engine_mod, "PlacementGroupSchedulingStrategy", lambda **kw: kw)
    monkeypatch.setattr(engine_mod.ray, "get", lambda ref: ref)
    engine_mod.create_vllm_engines(2, 1, "/m", 0, False, False, True, 256, lora_rank=lora_rank)
    return actor.created


@pytest.mark.parametrize("mode", ["native", "merged", None])
def test_engines_start_with_lora_only_in_native_mode_and_always_return_logprobs(engine_mod, monkeypatch, mode):
    """``create_vllm_engines`` reads ``RFT_LORA_SYNC`` (unset: native) and starts every engine with
    LoRA at the run's rank (8 is a rank vLLM takes) only in native mode; every engine returns its
    sampled tokens' processed log-probs, which 0.9.3 asks for only with IS correction."""
    if mode is None:
        monkeypatch.delenv("RFT_LORA_SYNC", raising=False)
    else:
        monkeypatch.setenv("RFT_LORA_SYNC", mode)
    created = _create_engines(engine_mod, monkeypatch, lora_rank=8)
    assert len(created) == 2
    for kwargs in created:
        assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["max_logprobs"] == 1
        lora = {k: kwargs.get(k) for k in ("enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras")}
        if mode == "merged":
            assert lora == dict.fromkeys(lora), lora
        else:
            assert lora == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1, "max_cpu_loras": 2}
    monkeypatch.setenv("RFT_LORA_SYNC", "native")
    assert "enable_lora" not in _create_engines(engine_mod, monkeypatch, lora_rank=0)[0]  # no LoRA policy


def test_the_trainer_hands_the_engines_its_lora_rank(patched_root):
    """``train()`` passes ``--lora_rank`` to ``create_vllm_engines`` (0.9.3 passes nothing of LoRA)."""
    import ast

    source = (patched_root / "openrlhf" / "cli" / "train_ppo_ray.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "create_vllm_engines"]
    assert len(calls) == 1
    assert {k.arg: ast.unparse(k.value) for k in calls[0].keywords}.get("lora_rank") == "args.lora_rank"


class _LoraRequestBoundary:
    """vLLM's ``LoRARequest`` at the import boundary: what a request names."""

    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class _NativeLLM:
    """Stands in for the engine client: TP workers answering ``load_lora_native``, and ``generate``
    recording the adapter each request names."""

    def __init__(self):
        self.calls, self.requests = [], []

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        row = {"lora_id": args[2], "tensors": 4, "modules": 2, "rank": 4, "target_sq": 4.0, "served_sq": 4.0,
               "unpack_s": 0.0, "apply_s": 0.0}
        return [row, row]

    async def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        self.requests.append(lora_request)
        yield "output"


def test_native_engine_syncs_natively_and_every_request_names_the_new_adapter(engine_mod, monkeypatch):
    request_mod = types.ModuleType("vllm.lora.request")
    request_mod.LoRARequest = _LoraRequestBoundary
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request_mod)
    cls = engine_mod.LLMRayActor.__ray_metadata__.modified_class
    llm = _NativeLLM()
    actor = types.SimpleNamespace(llm=llm, native_lora=native_lora.NativeLoraEngine.for_engine(native_lora.engine_lora_kwargs(8)))
    assert asyncio.run(cls.generate(actor, [1, 2], {})) == "output"
    for _ in range(2):
        evidence = asyncio.run(cls.apply_lora_update(actor, {"format": "f"}, b"\x00" * 8))
    assert asyncio.run(cls.generate(actor, [1, 2], {})) == "output"
    assert llm.calls == ["load_lora_native"] * 2  # no merge, no prefix-cache reset: the name changed
    assert evidence["lora_id"] == 2 and evidence["delta_norm"] == 2.0
    assert llm.requests[0] is None  # before the first sync: the base, as PEFT's B = 0 adapter is
    assert (llm.requests[1].lora_name, llm.requests[1].lora_int_id) == ("rft-policy-v2", 2)


def test_merged_engine_names_no_adapter(engine_mod):
    cls = engine_mod.LLMRayActor.__ray_metadata__.modified_class
    llm = _NativeLLM()
    actor = types.SimpleNamespace(llm=llm, native_lora=native_lora.NativeLoraEngine.for_engine({}))
    asyncio.run(cls.generate(actor, [1], {}))
    assert llm.requests == [None]
