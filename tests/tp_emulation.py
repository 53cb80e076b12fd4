"""Tensor-parallel emulation of how vLLM 0.15.1 loads gpt-oss attention weights.

vLLM cannot be installed without a GPU, so the tests and the benchmark rebuild the
parts of it that decide *where a checkpoint tensor lands* on each tensor-parallel
rank, following vLLM 0.15.1 line by line in behaviour:

* ``GptOssForCausalLM.hf_to_vllm_mapper`` (``model_executor/models/gpt_oss.py``):
  substring ``.self_attn.`` -> ``.attn.`` (plus the MoE suffix renames), and
  ``packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``.
* ``AutoWeightsLoader`` (``models/utils.py``): names are grouped by their first
  component with ``itertools.groupby``; a child module with its own
  ``load_weights`` gets the rest of the names; an unknown top-level prefix raises
  ``ValueError("There is no module or parameter named ...")``.
* ``GptOssModel.load_weights`` / ``_load_weights_mxfp4``: ``sinks`` are narrowed to
  this rank's heads; names containing ``.q_proj``/``.k_proj``/``.v_proj`` are
  renamed to ``.qkv_proj`` and loaded with shard id ``"q"``/``"k"``/``"v"``;
  every other name is loaded as is, and silently skipped when no parameter has it.
* ``QKVParallelLinear`` (``layers/linear.py``): per rank ``num_heads = H / tp``;
  ``num_kv_heads = KV / tp`` or 1 with ``num_kv_head_replicas = tp / KV`` when
  ``tp >= KV``; the fused weight is ``[q | k | v]`` rows of this rank. Its weight is
  a ``ModelWeightParameter`` (``UnquantizedLinearMethod`` is in
  ``WEIGHT_LOADER_V2_SUPPORTED``; MXFP4 falls back to it for linear layers), whose
  ``load_qkv_weight`` copies rows ``shard_rank * shard_size`` of the checkpoint
  tensor (``shard_rank = tp_rank`` for q, ``tp_rank // num_kv_head_replicas`` for
  k/v) into rows ``shard_offset`` of the fused parameter. The bias is a plain
  parameter loaded by the v1 ``weight_loader`` with the same offsets.
* ``RowParallelLinear``: the weight keeps all output rows and this rank's
  ``input_size / tp`` columns (``load_row_parallel_weight`` narrows dim 1 at
  ``tp_rank * shard``); the bias is replicated.
* Every copy is ``param.data.copy_(loaded)``: the value is cast to the parameter's
  dtype there, which is what the save-load-add sync relies on.

Experts are MXFP4 uint8 blocks in vLLM; the emulation keeps a small uint8 stand-in
(never loaded) so tests can check that a sync leaves them bitwise untouched.

The file ends with the LoRA sync tests' shared reference: random adapters, the payload the
trainer sends, the merge it must produce and bitwise comparisons.
"""

from __future__ import annotations

import itertools
import pickle
import types
from collections.abc import Iterable

import torch
from torch import nn

try:  # msgpack ships with ray; vLLM itself uses msgspec with the same wire types
    import msgpack
except ImportError:  # pragma: no cover - the test requirements install ray
    msgpack = None


# gpt-oss attention geometry (transformers GptOssConfig of the released checkpoints)
GPT_OSS_SHAPES = {
    "gpt-oss-20b": {"layers": 24, "hidden": 2880, "heads": 64, "kv_heads": 8, "head_dim": 64},
    "gpt-oss-120b": {"layers": 36, "hidden": 2880, "heads": 64, "kv_heads": 8, "head_dim": 64},
}


class WeightsMapper:
    """vLLM's ``WeightsMapper``: substring, then prefix, then suffix renames (first match each)."""

    def __init__(self, substr=None, prefix=None, suffix=None):
        self.substr, self.prefix, self.suffix = substr or {}, prefix or {}, suffix or {}

    def map_name(self, key: str) -> str | None:
        for old, new in self.substr.items():
            if old in key:
                if new is None:
                    return None
                key = key.replace(old, new, 1)
        for old, new in self.prefix.items():
            if key.startswith(old):
                if new is None:
                    return None
                key = key.replace(old, new, 1)
        for old, new in self.suffix.items():
            if key.endswith(old):
                if new is None:
                    return None
                key = new.join(key.rsplit(old, 1))
        return key

    def apply(self, weights):
        for name, data in weights:
            mapped = self.map_name(name)
            if mapped is not None:
                yield mapped, data

    def apply_list(self, values: list[str]) -> list[str]:
        return [mapped for name in values if (mapped := self.map_name(name)) is not None]


GPT_OSS_MAPPER = WeightsMapper(
    substr={".self_attn.": ".attn."},
    suffix={
        ".embed_tokens.weight": ".embedding.weight",
        ".gate_up_proj_blocks": ".w13_weight",
        ".down_proj_blocks": ".w2_weight",
        ".gate_up_proj_scales": ".w13_weight_scale",
        ".down_proj_scales": ".w2_weight_scale",
        ".gate_up_proj": ".w13_weight",
        ".down_proj": ".w2_weight",
        ".gate_up_proj_bias": ".w13_bias",
        ".down_proj_bias": ".w2_bias",
    },
)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """vLLM's default loader: same shape, copy (a 1-element parameter is filled)."""
    if param.numel() == 1 and loaded_weight.numel() == 1:
        param.data.fill_(loaded_weight.item())
    else:
        assert param.size() == loaded_weight.size(), (param.size(), loaded_weight.size())
        param.data.copy_(loaded_weight)


class ModelWeightParameter(nn.Parameter):
    """``vllm.model_executor.parameter.ModelWeightParameter`` (column and row loading)."""

    def __new__(cls, data, **kwargs):
        return super().__new__(cls, data=data, requires_grad=False)

    def __init__(self, data, *, input_dim: int, output_dim: int, weight_loader, tp_rank: int, tp_size: int):
        self.input_dim, self.output_dim = input_dim, output_dim
        self.weight_loader = weight_loader
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def load_qkv_weight(self, loaded_weight, *, shard_offset, shard_size, shard_id, num_heads, **_):
        shard_rank = self.tp_rank if shard_id == "q" else self.tp_rank // num_heads
        param_data = self.data.narrow(self.output_dim, shard_offset, shard_size)
        loaded_weight = loaded_weight.narrow(self.output_dim, shard_rank * shard_size, shard_size)
        assert param_data.shape == loaded_weight.shape
        param_data.copy_(loaded_weight)

    def load_row_parallel_weight(self, loaded_weight):
        shard_size = self.data.shape[self.input_dim]
        loaded_weight = loaded_weight.narrow(self.input_dim, self.tp_rank * shard_size, shard_size)
        assert self.data.shape == loaded_weight.shape
        self.data.copy_(loaded_weight)


def _param_with_loader(data: torch.Tensor, loader, **attrs) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = loader
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


class QKVParallelLinear(nn.Module):
    """``QKVParallelLinear`` of one tensor-parallel rank."""

    def __init__(self, hidden, head_dim, heads, kv_heads, tp_rank, tp_size, dtype, device, bias=True):
        super().__init__()
        assert heads % tp_size == 0
        self.tp_rank, self.tp_size, self.head_size = tp_rank, tp_size, head_dim
        self.num_heads = heads // tp_size
        if tp_size >= kv_heads:
            assert tp_size % kv_heads == 0
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp_size // kv_heads
        else:
            assert kv_heads % tp_size == 0
            self.num_kv_heads, self.num_kv_head_replicas = kv_heads // tp_size, 1
        rows = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.weight = ModelWeightParameter(
            torch.empty(rows, hidden, dtype=dtype, device=device),
            input_dim=1,
            output_dim=0,
            weight_loader=self.weight_loader_v2,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if bias:
            self.bias = _param_with_loader(
                torch.empty(rows, dtype=dtype, device=device), self.weight_loader, output_dim=0
            )

    def shard_offset_size(self, shard_id: str) -> tuple[int, int]:
        offsets = {"q": 0, "k": self.num_heads * self.head_size, "v": (self.num_heads + self.num_kv_heads) * self.head_size}
        sizes = {"q": self.num_heads * self.head_size, "k": self.num_kv_heads * self.head_size, "v": self.num_kv_heads * self.head_size}
        return offsets[shard_id], sizes[shard_id]

    def weight_loader_v2(self, param, loaded_weight, loaded_shard_id=None):
        if loaded_shard_id is None:
            raise NotImplementedError("fused on-disk qkv checkpoints are not emulated (gpt-oss ships q/k/v apart)")
        assert loaded_shard_id in ("q", "k", "v")
        offset, size = self.shard_offset_size(loaded_shard_id)
        param.load_qkv_weight(
            loaded_weight,
            num_heads=self.num_kv_head_replicas,
            shard_id=loaded_shard_id,
            shard_offset=offset,
            shard_size=size,
            tp_rank=self.tp_rank,
        )

    def weight_loader(self, param, loaded_weight, loaded_shard_id=None):
        """The v1 loader (used for the bias): same offsets as the weight, on ``output_dim``."""
        assert loaded_shard_id in ("q", "k", "v")
        offset, size = self.shard_offset_size(loaded_shard_id)
        param_data = param.data.narrow(param.output_dim, offset, size)
        shard_rank = self.tp_rank if loaded_shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        loaded_weight = loaded_weight.narrow(param.output_dim, shard_rank * size, size)
        assert param_data.shape == loaded_weight.shape
        param_data.copy_(loaded_weight)


class RowParallelLinear(nn.Module):
    """``RowParallelLinear`` of one tensor-parallel rank (input dimension split, bias replicated)."""

    def __init__(self, input_size, output_size, tp_rank, tp_size, dtype, device, bias=True):
        super().__init__()
        assert input_size % tp_size == 0
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = ModelWeightParameter(
            torch.empty(output_size, input_size // tp_size, dtype=dtype, device=device),
            input_dim=1,
            output_dim=0,
            weight_loader=self.weight_loader_v2,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if bias:
            self.bias = _param_with_loader(
                torch.empty(output_size, dtype=dtype, device=device), self.weight_loader, output_dim=0
            )

    def weight_loader_v2(self, param, loaded_weight):
        param.load_row_parallel_weight(loaded_weight)

    def weight_loader(self, param, loaded_weight):
        input_dim = getattr(param, "input_dim", None)
        param_data = param.data
        if input_dim is not None:
            size = param_data.shape[input_dim]
            loaded_weight = loaded_weight.narrow(input_dim, self.tp_rank * size, size)
        assert param_data.shape == loaded_weight.shape
        param_data.copy_(loaded_weight)


class OAIAttention(nn.Module):
    def __init__(self, geo, tp_rank, tp_size, dtype, device):
        super().__init__()
        heads, kv, dim, hidden = geo["heads"], geo["kv_heads"], geo["head_dim"], geo["hidden"]
        self.sinks = nn.Parameter(torch.empty(heads // tp_size, dtype=torch.float32, device=device), requires_grad=False)
        self.qkv_proj = QKVParallelLinear(hidden, dim, heads, kv, tp_rank, tp_size, dtype, device)
        self.o_proj = RowParallelLinear(heads * dim, hidden, tp_rank, tp_size, dtype, device)


class MLPBlock(nn.Module):
    """Router (bf16 linear) and a small uint8 stand-in for the MXFP4 expert blocks."""

    def __init__(self, geo, dtype, device, experts: int):
        super().__init__()
        self.router = nn.Linear(geo["hidden"], max(experts, 1), dtype=dtype, device=device)
        self.router.requires_grad_(False)
        self.experts = nn.Module()
        self.experts.w13_weight = nn.Parameter(
            torch.empty(max(experts, 1), 8, 16, dtype=torch.uint8, device=device), requires_grad=False
        )


class TransformerBlock(nn.Module):
    def __init__(self, geo, tp_rank, tp_size, dtype, device, experts):
        super().__init__()
        self.attn = OAIAttention(geo, tp_rank, tp_size, dtype, device)
        self.mlp = MLPBlock(geo, dtype, device, experts)
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.empty(geo["hidden"], dtype=dtype, device=device), requires_grad=False)


class GptOssModel(nn.Module):
    def __init__(self, geo, tp_rank, tp_size, dtype, device, experts):
        super().__init__()
        self.geo, self.tp_rank, self.tp_size = geo, tp_rank, tp_size
        self.layers = nn.ModuleList(
            TransformerBlock(geo, tp_rank, tp_size, dtype, device, experts) for _ in range(geo["layers"])
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The attention part of ``GptOssModel._load_weights_mxfp4`` (same order of checks)."""
        stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v")]
        heads_per_rank = self.geo["heads"] // self.tp_size
        head_start = self.tp_rank * heads_per_rank
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if ".w13_" in name or ".w2_" in name:
                raise NotImplementedError(f"{name}: MXFP4 expert loading is not emulated")
            if "sinks" in name:
                params[name].data.copy_(weight.narrow(0, head_start, heads_per_rank))
                loaded.add(name)
                continue
            for param_name, weight_name, shard_id in stacked:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                if loader == default_weight_loader:
                    loader(param, weight)
                else:
                    loader(param, weight, shard_id)
                break
            else:
                if name not in params:
                    continue
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded


class GptOssForCausalLM(nn.Module):
    """One tensor-parallel rank of vLLM's gpt-oss model, attention path only (plus stand-ins)."""

    hf_to_vllm_mapper = GPT_OSS_MAPPER
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def __init__(self, geo, tp_rank=0, tp_size=1, dtype=torch.bfloat16, device="cpu", experts=2):
        super().__init__()
        self.model = GptOssModel(geo, tp_rank, tp_size, dtype, device, experts)
        self.load_calls = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)``."""
        self.load_calls += 1
        loaded: set[str] = set()
        children = dict(self.named_children())
        split = ((name.split(".", 1), data) for name, data in self.hf_to_vllm_mapper.apply(weights))
        for prefix, group in itertools.groupby(split, key=lambda item: item[0][0]):
            rest = ((parts[1] if len(parts) > 1 else "", data) for parts, data in group)
            if prefix not in children:
                raise ValueError(f"There is no module or parameter named {prefix!r} in GptOssForCausalLM")
            loaded |= {f"{prefix}.{name}" for name in children[prefix].load_weights(rest)}
        return loaded


def hf_attention_names(layers: int) -> list[str]:
    """HF checkpoint names of the attention weights and biases of gpt-oss."""
    names = []
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [f"model.layers.{i}.self_attn.{proj}.weight", f"model.layers.{i}.self_attn.{proj}.bias"]
    return names


def hf_attention_shape(name: str, geo: dict) -> tuple[int, ...]:
    """Full (unsharded) HF shape of an attention weight or bias."""
    q, kv, hidden = geo["heads"] * geo["head_dim"], geo["kv_heads"] * geo["head_dim"], geo["hidden"]
    out_in = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
    proj = name.split(".")[-2]
    return out_in[proj] if name.endswith(".weight") else out_in[proj][:1]


def random_attention_checkpoint(geo, dtype=torch.bfloat16, device="cpu", seed=0) -> dict[str, torch.Tensor]:
    """Full HF attention tensors (weights ~ N(0, 0.02^2), biases, sinks) in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ckpt = {}
    for name in hf_attention_names(geo["layers"]):
        shape = hf_attention_shape(name, geo)
        ckpt[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    for i in range(geo["layers"]):
        ckpt[f"model.layers.{i}.self_attn.sinks"] = torch.randn(geo["heads"], generator=gen, device=device)
    return ckpt


def build_rank(geo, tp_rank, tp_size, checkpoint, dtype=torch.bfloat16, device="cpu", seed=0) -> GptOssForCausalLM:
    """One rank's model with ``checkpoint`` loaded through the emulated vLLM loader and the
    non-attention stand-ins filled with seeded random values."""
    model = GptOssForCausalLM(geo, tp_rank, tp_size, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype == torch.uint8:
                param.copy_(torch.randint(0, 256, param.shape, generator=gen, dtype=torch.uint8))
            else:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))
    model.load_weights(list(checkpoint.items()))
    model.load_calls = 0
    return model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def make_worker(worker_cls, model, device="cpu"):
    """An instance of ``worker_cls`` (OpenRLHF's ``WorkerWrap``) shaped like vLLM's Worker for the
    attributes the sync uses: ``device``, ``model_runner.model``, ``model_config.dtype``."""
    worker = worker_cls.__new__(worker_cls)
    worker.device = torch.device(device)
    worker.model_runner = types.SimpleNamespace(model=model)
    worker.model_config = types.SimpleNamespace(dtype=torch.bfloat16)
    return worker


def _msgpack_default(obj):
    if isinstance(obj, torch.Tensor):  # vLLM's enc_hook: (dtype, shape, raw bytes); untyped decode -> list
        return [str(obj.dtype).removeprefix("torch."), list(obj.shape), obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()]
    raise TypeError(f"{type(obj).__name__} is not msgpack-serializable")


def msgpack_roundtrip(obj):
    """What an argument of ``collective_rpc`` looks like after the client -> engine-core hop."""
    if msgpack is None:
        raise RuntimeError("msgpack is needed to emulate the collective_rpc crossing (pip install msgpack)")
    return msgpack.unpackb(msgpack.packb(obj, default=_msgpack_default, use_bin_type=True), raw=False)


class EmulatedAsyncLLM:
    """``AsyncLLM`` as ``LLMRayActor`` uses it for weight sync: ``collective_rpc`` and ``reset_prefix_cache``.

    Arguments cross msgpack once (client -> engine core); with TP > 1 (Ray executor) they are
    pickled again to every worker, with TP = 1 (uni executor) the worker is called in place.
    """

    def __init__(self, workers):
        self.workers = workers
        self.prefix_cache_resets = 0
        self.calls: list[str] = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        args = msgpack_roundtrip(list(args))
        results = []
        for worker in self.workers:
            worker_args = pickle.loads(pickle.dumps(args)) if len(self.workers) > 1 else args
            results.append(getattr(worker, method)(*worker_args, **(kwargs or {})))
        return msgpack_roundtrip(results)

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.prefix_cache_resets += 1
        return True


class EngineHarness:
    """Stands in for one ``LLMRayActor`` as a Ray actor (``ray.remote(EngineHarness)``).

    Its ``apply_lora_update`` is the patched ``LLMRayActor.apply_lora_update`` itself,
    run on an :class:`EmulatedAsyncLLM` of ``tp`` emulated ranks whose workers are
    the patched ``WorkerWrap``. The Ray actor receives the payload the way the real
    engine does: the object-store reference is a top-level argument, resolved by Ray.
    """

    def __init__(self, patched_root: str, geo: dict, tp: int, checkpoint: dict):
        import sys

        import conftest
        import oprl

        sys.modules.update(conftest.make_vllm_stub())  # this process imports the patched modules
        engine_mod = oprl.load(patched_root, "openrlhf.trainer.ray.vllm_engine")
        wrap = oprl.load(patched_root, "openrlhf.trainer.ray.vllm_worker_wrap")
        self.models = [build_rank(geo, r, tp, checkpoint) for r in range(tp)]
        self.llm = EmulatedAsyncLLM([make_worker(wrap.WorkerWrap, model) for model in self.models])
        self._apply = engine_mod.LLMRayActor.__ray_metadata__.modified_class.apply_lora_update

    def apply_lora_update(self, spec, payload=None):
        import asyncio

        from rft.openrlhf.native_lora import NativeLoraEngine

        # an engine started without LoRA: the merged path, which this harness emulates
        engine = types.SimpleNamespace(llm=self.llm, native_lora=NativeLoraEngine.for_engine({}))
        return asyncio.run(self._apply(engine, spec, payload))

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [state_copy(model) for model in self.models]


# ----------------------------------------------------------------------------- the sync tests' reference
# Adapters, the payload the trainer sends and the merge it must produce, shared by the tests of
# both halves of the LoRA sync (tests/test_hook_lora_sync.py, tests/test_hook_vllm_lora_delta.py,
# tests/test_lora_sync.py).


def random_adapter(
    geo: dict, targets: Iterable[tuple[int, str]], rank=4, seed=0, scale=2.0, magnitude=1.0, device="cpu"
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{hf_weight_name: (A, B, scale)}`` for the given ``(layer, proj)`` targets (fp32 A, B)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter = {}
    for layer, proj in targets:
        name = f"model.layers.{layer}.self_attn.{proj}.weight"
        out_dim, in_dim = hf_attention_shape(name, geo)
        a = torch.randn(rank, in_dim, generator=gen) * 0.05 * magnitude
        b = torch.randn(out_dim, rank, generator=gen) * 0.05 * magnitude
        adapter[name] = (a.to(device), b.to(device), scale)
    return adapter


def adapter_payload(codec: types.ModuleType, adapter: dict, dtype=torch.float32) -> tuple[dict, bytes]:
    """The spec and bytes the trainer sends (``LoraSync.pack``'s format), packed by ``codec``'s ``pack_tensors``."""
    named, targets = [], []
    for name, (a, b, scale) in adapter.items():
        named += [(f"{name}:A", a.to(dtype)), (f"{name}:B", b.to(dtype))]
        targets.append([name, scale])
    buffer, entries = codec.pack_tensors(named)
    spec = {"format": codec.LORA_PAYLOAD_FORMAT, "nbytes": buffer.numel(), "entries": entries, "targets": targets}
    return spec, buffer.cpu().numpy().tobytes()


def merged_checkpoint(checkpoint: dict, adapter: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Reference: full HF tensors ``bf16(W0 + scale * B @ A)``, computed here from the adapter."""
    merged = dict(checkpoint)
    for name, (a, b, scale) in adapter.items():
        delta = (b.to(dtype).float() @ a.to(dtype).float()) * scale
        merged[name] = (checkpoint[name].float() + delta).to(checkpoint[name].dtype)
    return merged


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of its element size (NaN and -0.0 compare exactly)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise(actual: dict, expected: dict, names=None) -> None:
    """Each of ``names`` (default: all of ``expected``) is bit for bit the same in both."""
    for name in names or expected:
        assert torch.equal(bits(actual[name].cpu()), bits(expected[name].cpu())), f"{name} differs"


def codec_sample_tensors(dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Named tensors a byte codec must carry exactly: NaN, infinities, -0.0, subnormals, empty and 0-d."""
    gen = torch.Generator().manual_seed(1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-45])
    return [
        ("a", torch.cat([torch.randn(37, generator=gen), special]).to(dtype)),
        ("b", torch.randn(5, 3, 7, generator=gen).to(dtype)),
        ("empty", torch.zeros(0, 4, dtype=dtype)),
        ("scalar", torch.tensor(3.25, dtype=dtype)),
    ]
