"""actor.patch: MXFP4 gpt-oss checkpoints load dequantized and ZeRO-3 partitioned; nothing else changes.

Everything here runs the real OpenRLHF 0.9.3 ``Actor`` (pristine and patched trees
side by side), real transformers 4.57.6 loading and real DeepSpeed ZeRO-3
partitioning, on the CPU: DeepSpeed's CPU accelerator and a one-process gloo group
stand in for the GPU and NCCL. The checkpoints are tiny random models written by
``tests/tiny_gptoss.py`` (gpt-oss with MXFP4 experts, the same in bf16) and by
transformers (a Llama), so no hub is needed. The patch's hook module,
``rft/openrlhf/mxfp4_load.py``, has its own unit tests in ``tests/test_mxfp4_load.py``
(detection from config.json, the refused settings, the load arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import conftest
import oprl
from tiny_gptoss import build_tiny_gptoss, dequantize_mxfp4, mxfp4_error_bound

EXPERT_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mxfp4_ckpt(tmp_path_factory):
    return build_tiny_gptoss(tmp_path_factory.mktemp("gptoss-mxfp4"), mxfp4=True, seed=0)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return build_tiny_gptoss(tmp_path_factory.mktemp("gptoss-bf16"), mxfp4=False, seed=0)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers (a checkpoint the patch must not touch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dist_group():
    """A one-process gloo group on DeepSpeed's CPU accelerator: what ZeRO-3 needs to partition."""
    with conftest.one_process_gloo_world():
        yield


@pytest.fixture
def no_live_hf_ds_config():
    """Each test starts and ends with no HfDeepSpeedConfig registered in transformers."""
    from transformers.integrations import deepspeed as hf_deepspeed

    hf_deepspeed.unset_hf_deepspeed_config()
    yield
    hf_deepspeed.unset_hf_deepspeed_config()


def _tree(request, variant: str) -> Path:
    return request.getfixturevalue(f"{variant}_root")


def _ds_configs(root: Path) -> dict[str, dict]:
    """The DeepSpeed configs OpenRLHF gives the policy, the reference model and the EMA model
    (``ppo_actor.py``: train config; ``launcher.py``: eval config; EMA: eval config, offloaded)."""
    strategy_mod = oprl.load(root, "openrlhf.utils.deepspeed.deepspeed")
    args = argparse.Namespace(param_dtype="bf16", local_rank=-1)
    strategy = strategy_mod.DeepspeedStrategy(
        seed=0, max_norm=1.0, micro_train_batch_size=1, train_batch_size=1, zero_stage=3, args=args
    )
    return {
        "actor": strategy.get_ds_train_config(is_actor=True),
        "ref": strategy.get_ds_eval_config(offload=False),
        "ema": strategy.get_ds_eval_config(offload=True),
    }


def _gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of every parameter and buffer, gathering ZeRO-3 partitions when there are any."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=any(hasattr(p, "ds_id") for p in params.values())):
        state = {name: p.detach().clone() for name, p in params.items()}
    state.update({name: b.detach().clone() for name, b in model.named_buffers()})
    return state


def _strip_peft(name: str) -> str:
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Records the arguments of every AutoModelForCausalLM.from_pretrained call (the real method runs)."""
    from transformers import AutoModelForCausalLM

    calls: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        calls.append({"args": args, **kwargs})
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    return calls


# --------------------------------------------------------------------------- dequantized loading


def test_mxfp4_loads_to_the_weights_it_was_made_from(patched_root, mxfp4_ckpt, from_pretrained_calls):
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    actor = actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", param_dtype="bf16")
    state = dict(actor.model.named_parameters())

    assert len(from_pretrained_calls) == 1
    quant = from_pretrained_calls[0]["quantization_config"]
    assert type(quant).__name__ == "Mxfp4Config" and quant.dequantize is True
    assert from_pretrained_calls[0]["torch_dtype"] == torch.bfloat16
    assert getattr(actor.model.config, "quantization_config", None) is None  # removed after dequantizing

    assert set(state) == set(mxfp4_ckpt.source)
    n_expert = 0
    for name, source in mxfp4_ckpt.source.items():
        loaded = state[name].detach()
        assert loaded.dtype == torch.bfloat16, name
        if name.endswith(EXPERT_WEIGHTS):
            n_expert += 1
            # exactly the decoded MXFP4 values (every FP4 value times a power of two is a bf16 number)
            decoded = dequantize_mxfp4(mxfp4_ckpt.stored[f"{name}_blocks"], mxfp4_ckpt.stored[f"{name}_scales"])
            assert torch.equal(loaded.float(), decoded.transpose(1, 2)), name
            # and the random weights they were made from, to MXFP4 precision (half a grid step)
            bound = mxfp4_error_bound(source.transpose(1, 2)).transpose(1, 2)
            error = (loaded.float() - source).abs()
            assert torch.all(error <= bound * (1 + 1e-6)), (name, (error - bound).max().item())
            assert error.max() > 0  # really quantized, not stored in full precision
        else:
            assert torch.equal(loaded, source.to(torch.bfloat16)), name
    assert n_expert == 2 * mxfp4_ckpt.config["num_hidden_layers"]


@pytest.mark.parametrize("variant", ["pristine", "patched"])
def test_zero3_partitions_before_deepspeed_sees_the_model(
    request, variant, mxfp4_ckpt, dist_group, no_live_hf_ds_config, from_pretrained_calls
):
    """Actor, reference and EMA constructions under ZeRO-3.

    Pristine 0.9.3 cannot load an MXFP4 checkpoint at all: it passes
    ``quantization_config=None``, which replaces the checkpoint's own, and
    transformers 4.57.6 fails formatting the config. Patched: loaded on the CPU
    with ``device_map="cpu"`` and every base parameter is a ZeRO-3 partition before
    ``deepspeed.initialize``, which would otherwise move the whole model to the GPU
    (``engine.py``: ``module.to(device)`` unless parameters carry ``ds_id``).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    root = _tree(request, variant)
    configs = _ds_configs(root)
    actor_mod = oprl.load(root, "openrlhf.models.actor")
    reference = {k: v.to(torch.bfloat16) for k, v in _expected_bf16_state(mxfp4_ckpt).items()}

    for role, ds_config in configs.items():
        lora = {"lora_rank": 8, "target_modules": LORA_TARGETS} if role == "actor" else {}
        if variant == "pristine":
            with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'to_dict'"):
                actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", ds_config=ds_config, **lora)
            assert from_pretrained_calls[-1]["quantization_config"] is None
            continue
        actor = actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", ds_config=ds_config, **lora)
        params = dict(actor.model.named_parameters())
        base = {n: p for n, p in params.items() if "lora_" not in n}
        assert all(hasattr(p, "ds_id") for p in base.values()), role
        assert from_pretrained_calls[-1]["device_map"] == "cpu"
        if role == "ema":  # offload_param: partitions live in host memory
            assert all(p.ds_tensor.device.type == "cpu" for p in base.values())
        if role == "actor":
            assert sum("lora_A" in n for n in params) == len(LORA_TARGETS) * 2
        assert not is_deepspeed_zero3_enabled()  # no config outlives __init__, as in 0.9.3
        gathered = {_strip_peft(n): v for n, v in _gathered_state(actor.model).items() if "lora_" not in n}
        for name, value in reference.items():
            assert torch.equal(gathered[name], value), (role, name)


def _expected_bf16_state(ckpt) -> dict[str, torch.Tensor]:
    """The bf16 values a correct dequantizing load yields for every parameter of ``ckpt``."""
    expected = {}
    for name, source in ckpt.source.items():
        if name.endswith(EXPERT_WEIGHTS):
            decoded = dequantize_mxfp4(ckpt.stored[f"{name}_blocks"], ckpt.stored[f"{name}_scales"])
            expected[name] = decoded.transpose(1, 2)
        else:
            expected[name] = source.to(torch.bfloat16)
    return expected


@pytest.mark.parametrize("variant", ["pristine", "patched"])
def test_device_map_cpu_under_live_zero3_config(
    request, variant, mxfp4_ckpt, bf16_ckpt, dist_group, no_live_hf_ds_config
):
    """transformers refuses a device_map while a ZeRO-3 HfDeepSpeedConfig is alive.

    0.9.3 creates that config before loading, so ``device_map="cpu"`` raises (shown with
    the bf16 gpt-oss, which 0.9.3 can load; the patch keeps that path as it is). For
    MXFP4 the patch loads first, and also hides a config held elsewhere in the process
    during the load, restoring it afterwards.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    root = _tree(request, variant)
    ds_config = _ds_configs(root)["ref"]
    actor_mod = oprl.load(root, "openrlhf.models.actor")
    with pytest.raises(ValueError, match="DeepSpeed Zero-3 is not compatible with passing a `device_map`"):
        actor_mod.Actor(str(bf16_ckpt.path), attn_implementation="eager", ds_config=ds_config, device_map="cpu")
    if variant == "pristine":
        return

    held_elsewhere = HfDeepSpeedConfig(ds_config)
    assert is_deepspeed_zero3_enabled()
    actor = actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", ds_config=ds_config, device_map="cpu")
    assert all(hasattr(p, "ds_id") for p in actor.model.parameters())
    assert is_deepspeed_zero3_enabled()  # the other holder's config is back
    from transformers.integrations import deepspeed as hf_deepspeed

    assert hf_deepspeed._hf_deepspeed_config_weak_ref() is held_elsewhere


# --------------------------------------------------------------------------- everything else unchanged


@pytest.mark.parametrize("checkpoint", ["llama", "gptoss_bf16"])
@pytest.mark.parametrize("zero3", [False, True], ids=["no-ds", "zero3"])
def test_non_mxfp4_loads_exactly_as_pristine(
    request, checkpoint, zero3, llama_path, bf16_ckpt, dist_group, no_live_hf_ds_config, from_pretrained_calls
):
    path = str(llama_path if checkpoint == "llama" else bf16_ckpt.path)
    results = {}
    for variant in ("pristine", "patched"):
        root = _tree(request, variant)
        ds_config = _ds_configs(root)["actor"] if zero3 else None
        actor_mod = oprl.load(root, "openrlhf.models.actor")
        start = len(from_pretrained_calls)
        actor = actor_mod.Actor(
            path, attn_implementation="eager", ds_config=ds_config, lora_rank=8, target_modules=LORA_TARGETS
        )
        calls = from_pretrained_calls[start:]
        results[variant] = {
            "calls": calls,
            "state": _gathered_state(actor.model),
            "partitioned": {n: hasattr(p, "ds_id") for n, p in actor.model.named_parameters()},
            "trainable": {n: p.requires_grad for n, p in actor.model.named_parameters()},
            "config": actor.model.config.to_dict(),
        }

    pristine, patched = results["pristine"], results["patched"]
    assert len(patched["calls"]) == 1
    assert repr(patched["calls"]) == repr(pristine["calls"])  # same from_pretrained arguments
    assert patched["partitioned"] == pristine["partitioned"]
    assert patched["trainable"] == pristine["trainable"]
    assert patched["config"] == pristine["config"]
    assert pristine["state"].keys() == patched["state"].keys()
    for name in pristine["state"]:
        if "lora_A" in name:  # random init: drawn from the global generator, differs between runs
            assert patched["state"][name].shape == pristine["state"][name].shape
            continue
        a, b = pristine["state"][name], patched["state"][name]
        assert a.dtype == b.dtype and torch.equal(a, b), name


# --------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa"])
@pytest.mark.parametrize("ckpt_name", ["mxfp4_ckpt", "bf16_ckpt"])
def test_gpt_oss_attention_without_sinks_refused(request, patched_root, ckpt_name, attn, from_pretrained_calls):
    ckpt = request.getfixturevalue(ckpt_name)
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    with pytest.raises(ValueError) as err:
        actor_mod.Actor(str(ckpt.path), attn_implementation=attn)
    message = str(err.value)
    assert "\n" not in message
    assert str(ckpt.path) in message and "sinks" in message and "--attn_implementation eager" in message
    assert from_pretrained_calls == []  # refused before any weight is read


def test_gpt_oss_packing_refused(patched_root, mxfp4_ckpt, from_pretrained_calls):
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    with pytest.raises(ValueError, match=r"remove --packing_samples$"):
        actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", packing_samples=True)
    assert from_pretrained_calls == []


def test_other_models_keep_their_attention_choice(patched_root, llama_path):
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    actor = actor_mod.Actor(str(llama_path), attn_implementation="sdpa")
    assert actor.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"load_in_4bit": True}, "remove --load_in_4bit"),
        ({"param_dtype": "fp16"}, "pass --param_dtype bf16"),
    ],
)
def test_mxfp4_incompatible_settings_refused(patched_root, mxfp4_ckpt, kwargs, fix, from_pretrained_calls):
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    with pytest.raises(ValueError) as err:
        actor_mod.Actor(str(mxfp4_ckpt.path), attn_implementation="eager", **kwargs)
    assert fix in str(err.value) and str(mxfp4_ckpt.path) in str(err.value) and "\n" not in str(err.value)
    assert from_pretrained_calls == []


# --------------------------------------------------------------------------- tiny checkpoint


def test_tiny_checkpoint_layout(mxfp4_ckpt):
    """The layout transformers 4.57.6 expects for MXFP4 experts (``Mxfp4GptOssExperts``)."""
    from safetensors import safe_open

    config = json.loads((mxfp4_ckpt.path / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["quantization_config"]["quant_method"] == "mxfp4"
    e, h, i = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    with safe_open(str(mxfp4_ckpt.path / "model.safetensors"), "pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    prefix = "model.layers.0.mlp.experts."
    assert shapes[prefix + "gate_up_proj_blocks"] == ((e, 2 * i, h // 32, 16), "U8")
    assert shapes[prefix + "gate_up_proj_scales"] == ((e, 2 * i, h // 32), "U8")
    assert shapes[prefix + "down_proj_blocks"] == ((e, h, i // 32, 16), "U8")
    assert shapes[prefix + "down_proj_scales"] == ((e, h, i // 32), "U8")
    assert shapes[prefix + "gate_up_proj_bias"] == ((e, 2 * i), "BF16")
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in shapes)


def test_quantize_mxfp4_picks_the_nearest_value():
    """Every decoded value is the nearest point of the group's scaled FP4 grid (ties to the smaller)."""
    from tiny_gptoss import FP4_MAGNITUDES, quantize_mxfp4

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=gen) * torch.logspace(-4, 1, 6).unsqueeze(-1)
    w[0, :8] = torch.tensor([0.0, -0.0, 6.0, -6.0, 0.25, 0.75, 5.0, -2.5])  # group max 6: scale 1, ties
    decoded = dequantize_mxfp4(*quantize_mxfp4(w))
    groups = w.reshape(6, 2, 32)
    scale = torch.exp2(torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True) / 6.0)))
    grid = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES))
    candidates = grid * scale.unsqueeze(-1)  # [6, 2, 1, 16]
    distance = (groups.unsqueeze(-1) - candidates).abs()
    assert torch.allclose((decoded.reshape(6, 2, 32) - groups).abs(), distance.min(-1).values, rtol=0, atol=0)
    assert decoded[0, :8].tolist() == [0.0, 0.0, 6.0, -6.0, 0.0, 0.5, 4.0, -2.0]


# --------------------------------------------------------------------------- canaries


def test_canary_pristine_actor_hooks():
    """The 0.9.3 lines actor.patch hooks into; if this fails, upstream changed how the Actor loads:
    remake the patch (and retire it if upstream now loads MXFP4 checkpoints for training)."""
    source = (oprl.SITE / "openrlhf" / "models" / "actor.py").read_text()
    for line in (
        "            attn_impl = attn_implementation\n",
        '            if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:\n'
        "                dschf = HfDeepSpeedConfig(ds_config)\n",
        "            self.model = model_class.from_pretrained(\n                pretrain_or_model,\n",
        "                quantization_config=nf4_config,\n",
    ):
        assert line in source
    assert "mxfp4" not in source.lower() and "gpt_oss" not in source


def test_canary_deepspeed_moves_unpartitioned_models_whole():
    """Why the patch partitions before deepspeed.initialize: DeepSpeed 0.18.5 moves a model whose
    parameters carry no ``ds_id`` to the GPU in one piece. If this changes, the partitioning step
    may become unnecessary."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine._configure_distributed_model)
    assert 'hasattr(param, "ds_id")' in source
    assert "if not (self.dont_change_device or is_zero_init_model):" in source
    assert "self.module.to(self.device)" in source


def test_canary_mxfp4_dequantize_keeps_the_target_device():
    """transformers 4.57.6 decodes each expert tensor (on the GPU when there is one) and moves the
    result to the load's target device: with device_map="cpu" no decoded tensor stays on the GPU."""
    import inspect

    from transformers.integrations import mxfp4

    source = inspect.getsource(mxfp4.dequantize)
    assert "torch.nn.Parameter(dequantized.to(target_device))" in source
    assert "blocks = blocks.cuda()" in inspect.getsource(mxfp4.convert_moe_packed_tensors)


# --------------------------------------------------------------------------- two ranks


def _two_rank_worker(root: str, ckpt: str, rank: int, port: int, out: str) -> None:
    """One rank of a two-process gloo group: build the patched actor under ZeRO-3 and report.

    Writes the rank's partition sizes to ``out`` and the gathered base weights beside it
    (``.pt``), for the test to compare with the values the checkpoint decodes to.
    """
    import types

    import conftest

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys_modules = __import__("sys").modules
    sys_modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))  # as tests/conftest.py
    import deepspeed

    conftest.complete_async_gathers()  # gloo: each async all-gather complete before it returns
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    strategy_mod = oprl.load(Path(root), "openrlhf.utils.deepspeed.deepspeed")
    args = argparse.Namespace(param_dtype="bf16", local_rank=-1)
    strategy = strategy_mod.DeepspeedStrategy(seed=0, max_norm=1.0, micro_train_batch_size=1, train_batch_size=2,
                                              zero_stage=3, args=args)
    actor_mod = __import__("sys").modules["openrlhf.models.actor"]
    actor = actor_mod.Actor(ckpt, attn_implementation="eager", ds_config=strategy.get_ds_train_config(is_actor=True),
                            lora_rank=8, target_modules=LORA_TARGETS)
    base = {_strip_peft(n): p for n, p in actor.model.named_parameters() if "lora_" not in n}
    local = sum(p.ds_tensor.numel() for p in base.values())
    full = sum(p.ds_numel for p in base.values())
    gathered = {_strip_peft(n): v for n, v in _gathered_state(actor.model).items() if "lora_" not in n}
    torch.save({n: gathered[n] for n in base}, Path(out).with_suffix(".pt"))
    Path(out).write_text(json.dumps({"local": local, "full": full, "n": len(base)}))
    # Leave the group before exit: torn down by the interpreter instead, gloo's threads can
    # abort the process ("terminate called without an active exception") after the work is done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero3_partition_across_two_ranks(patched_root, mxfp4_ckpt, tmp_path):
    """Two processes (gloo): each rank keeps half of every weight, and gathering gives the checkpoint's values."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests_dir = str(Path(__file__).resolve().parent)
    procs = []
    for rank in range(2):
        code = (f"import sys; sys.path[:0] = [{tests_dir!r}]; import test_actor_patch as t; "
                f"t._two_rank_worker({str(patched_root)!r}, {str(mxfp4_ckpt.path)!r}, {rank}, {port}, "
                f"{str(tmp_path / f'rank{rank}.json')!r})")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # decoded here by the test's own MXFP4 decoder (FP4 values times powers of two: exact in bf16)
    expected = {k: v.to(torch.bfloat16) for k, v in _expected_bf16_state(mxfp4_ckpt).items()}
    for r, report in enumerate(reports):
        assert report["n"] == len(mxfp4_ckpt.source)
        gathered = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert gathered.keys() == expected.keys()
        for name, value in expected.items():
            assert gathered[name].dtype == torch.bfloat16 and torch.equal(gathered[name], value), (r, name)
        # each rank holds its half (DeepSpeed pads every tensor to an even split)
        assert report["full"] / 2 <= report["local"] <= report["full"] / 2 + report["n"]
