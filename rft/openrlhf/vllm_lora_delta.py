"""The vLLM side of rft's LoRA sync: the engine's dispatch and the worker's exact merge.

OpenRLHF 0.9.3 syncs a LoRA policy by sending PEFT parameter names that vLLM's
``load_weights`` rejects, so LoRA runs cannot sync at all. rft's trainer instead packs every
``lora_A``/``lora_B`` matrix into one byte buffer (:func:`pack_tensors`) and the patched
``LLMRayActor`` and ``WorkerWrap`` hand it here:

* :func:`apply_lora_update` (engine, ``vllm_engine.py``) gives the one payload to every TP
  worker through ``collective_rpc("apply_lora_delta", ...)`` as ``bytes``: the one argument
  type that crosses vLLM's msgpack hop to the engine core (TP = 1, ``uni`` executor) and the
  pickle hop to Ray TP workers (TP > 1) unchanged; a tensor would arrive as a list. It then
  resets the prefix cache (its blocks hold the old weights' keys and values) and sums the
  workers' evidence (:func:`summarize_lora_evidence`).
* :func:`apply_lora_delta` (worker, ``vllm_worker_wrap.py``) computes ``delta = scale * B @ A``
  in fp32 and lets vLLM's own ``model.load_weights`` place it: the target parameter's storage
  is swapped for a zeroed fp32 scratch while the loader runs, so the loader does the TP slicing
  and stacks q/k/v into the fused ``qkv_proj`` (shard ids ``q``/``k``/``v``), writing only the
  delta's shard; the sibling slices stay zero rather than doubling the base. The served weight
  is then ``bf16(W0 + delta)`` from a pristine copy of the base shard: one rounding, the same
  after any number of syncs, and ``W0`` bit for bit wherever the delta is zero.

Every function takes plain values (a worker, a model, tensors, an engine client) so that it
can be tested without OpenRLHF; the patches only call it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# The payload format is the trainer's, defined once in rft/openrlhf/lora_sync.py; the worker side
# (this module, its tests and benches) takes the codec from here.
from rft.openrlhf.lora_sync import (  # noqa: F401
    LORA_PAYLOAD_FORMAT,
    PACK_ALIGN,
    PACKABLE_DTYPES,
    pack_tensors,
    unpack_tensors,
)

from rft.contract import ENV_LORA_PRISTINE, ENV_LORA_SCRATCH_MB

PRISTINE_PLACES = ("cpu", "gpu")
"""Values of ``RFT_LORA_PRISTINE``: ``cpu`` (pinned host memory, the default: vLLM sized its KV
cache to the GPU memory left at start) or ``gpu`` (saves one host-to-device copy per sync)."""
DEFAULT_SCRATCH_MB = 512
"""``RFT_LORA_SCRATCH_MB`` unset: device memory for fp32 scratch and deltas at once; more means
fewer ``load_weights`` calls."""

Evidence = dict[str, float]


# ----------------------------------------------------------------------------- payload crossing
def bytes_to_uint8(blob: Any) -> torch.Tensor:
    """A CPU uint8 tensor over ``blob`` (bytes, bytearray, memoryview or numpy array), without a copy."""
    if hasattr(blob, "dtype") and not isinstance(blob, (bytes, bytearray, memoryview)):
        blob = memoryview(blob).cast("B")  # a numpy array from the object store
    if len(blob) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # bytes are read-only; the tensor is only read (copied to the device) before it is dropped
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(blob, dtype=torch.uint8)


def payload_bytes(payload: Any) -> bytes:
    """The packed buffer as ``bytes``, the one type that crosses ``collective_rpc`` unchanged."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if hasattr(payload, "tobytes") and hasattr(payload, "dtype"):  # a numpy array from the object store
        return payload.tobytes()
    raise TypeError(f"LoRA payload must be bytes or a uint8 array, got {type(payload).__name__}")


# ----------------------------------------------------------------------------- engine side
def summarize_lora_evidence(results: Sequence[dict], engine_seconds: float, prefix_cache_reset: Any) -> Evidence:
    """One engine's evidence from its TP workers' :func:`apply_lora_delta` results (plain floats).

    Shards are disjoint across TP ranks, so squared norms and entry counts add up; every worker
    computes the same full fp32 deltas, so the target norm is the first worker's.
    """
    if not results:
        raise RuntimeError("apply_lora_update: the engine returned no worker results")
    changed = sum(r["changed"] for r in results)
    numel = sum(r["numel"] for r in results)
    return {
        "engine_s": float(engine_seconds),
        "unpack_s": float(max(r["unpack_s"] for r in results)),
        "apply_s": float(max(r["apply_s"] for r in results)),
        "delta_norm": math.sqrt(sum(r["delta_sq"] for r in results)),
        "target_norm": math.sqrt(results[0]["target_sq"]),
        "changed_frac": changed / numel if numel else 0.0,
        "workers": float(len(results)),
        "prefix_cache_reset": float(prefix_cache_reset is not False),
    }


async def apply_lora_update(llm: Any, spec: dict, payload: Any = None) -> Evidence:
    """``LLMRayActor.apply_lora_update``: merge one packed adapter on every TP worker of ``llm``.

    ``payload`` is the packed buffer (resolved from the Ray object store by Ray, as a top-level
    argument), or None when trainer rank 0 broadcasts it over the model-update group right after
    firing this call. The prefix cache is reset afterwards: its blocks hold the old weights'.
    """
    start = time.perf_counter()
    args = (spec, None, "nccl") if payload is None else (spec, payload_bytes(payload), "bytes")
    results = await llm.collective_rpc("apply_lora_delta", args=args)
    reset = await llm.reset_prefix_cache()
    return summarize_lora_evidence(results, time.perf_counter() - start, reset)


async def update_weight_from_ref(llm: Any, name: str, dtype: Any, shape: Sequence[int], weight: Any) -> list:
    """``LLMRayActor.update_weight_from_ref``: load one full weight from the object store everywhere.

    ``weight`` (a CPU tensor or numpy array, resolved by Ray) crosses ``collective_rpc`` as
    ``bytes``, with its dtype and shape beside it.
    """
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    args = (name, str(dtype).removeprefix("torch."), list(shape), payload_bytes(weight))
    return await llm.collective_rpc("update_weight_from_ray_ref", args=args)


# ----------------------------------------------------------------------------- worker side
def worker_device(worker: Any) -> torch.device:
    """The device a vLLM worker serves on.

    vLLM's GPU worker sets ``worker.device``; its CPU worker (``CPUWorker``, vLLM 0.15.1
    ``v1/worker/cpu_worker.py``) never does, and there the model runner's ``device`` is the truth.
    """
    device = getattr(worker, "device", None)
    if device is None:
        device = worker.model_runner.device
    return torch.device(device)


def resolve_vllm_param(model: Any, hf_name: str, param_names: Iterable[str]) -> str:
    """Name of the served parameter that ``model.load_weights`` writes for the HF weight ``hf_name``.

    Read from the model's own metadata: ``hf_to_vllm_mapper`` (gpt-oss: ``.self_attn.`` ->
    ``.attn.``) and ``packed_modules_mapping`` (gpt-oss: q/k/v_proj -> ``qkv_proj``).
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapped = mapper.apply_list([hf_name]) if mapper is not None else [hf_name]
    if not mapped:
        raise ValueError(f"{hf_name}: the served model's hf_to_vllm_mapper drops this weight")
    name = mapped[0]
    module, _, leaf = name.rpartition(".")
    parent, _, child = module.rpartition(".")
    for packed, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        if child in parts:
            candidate = ".".join(part for part in (parent, packed, leaf) if part)
            if candidate in param_names:
                return candidate
    if name in param_names:
        return name
    raise ValueError(
        f"{hf_name}: the served model has no parameter for this weight (looked for {name}); LoRA sync "
        "merges adapters on linear layers the engine serves unquantized, e.g. gpt-oss attention q/k/v/o"
    )


@dataclass
class LoraSyncState:
    """What a worker keeps between syncs: the base shards it adapted, and resolved names."""

    where: str
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)


def sync_state(worker: Any) -> LoraSyncState:
    """The worker's :class:`LoraSyncState`, created at its first sync (reads ``RFT_LORA_PRISTINE``)."""
    state = getattr(worker, "_lora_sync", None)
    if state is None:
        where = os.environ.get(ENV_LORA_PRISTINE, "cpu")
        if where not in PRISTINE_PLACES:
            raise ValueError(f"{ENV_LORA_PRISTINE}={where!r}: use 'cpu' (pinned host copy, default) or 'gpu'")
        state = worker._lora_sync = LoraSyncState(where)
    return state


def save_pristine(data: torch.Tensor, where: str) -> torch.Tensor:
    """A copy of a base shard: on its device (``where="gpu"``, or off CUDA) or in pinned host memory."""
    if where == "gpu" or data.device.type != "cuda":
        return data.detach().clone()
    host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    host.copy_(data)
    return host


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view of a floating tensor, for bitwise comparisons (NaN == NaN, -0.0 != +0.0)."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def group_targets(
    targets: Iterable[Sequence], tensors: dict[str, torch.Tensor], resolve, params: dict[str, torch.nn.Parameter]
) -> dict[str, list[tuple[str, float, torch.Tensor, torch.Tensor]]]:
    """``{served parameter: [(hf_name, scale, A, B), ...]}``, refusing anything that cannot merge.

    Everything is checked before any weight is written: shapes, a float target, and finite
    matrices (a NaN merged into bf16 weights would poison every rollout after it).
    """
    groups: dict[str, list] = {}
    for hf_name, scale in targets:
        a, b = tensors[f"{hf_name}:A"], tensors[f"{hf_name}:B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{hf_name}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} is not a 2-D product")
        pname = resolve(hf_name)
        if not params[pname].dtype.is_floating_point:
            raise ValueError(
                f"{hf_name}: served as {pname} with dtype {params[pname].dtype}; only float weights can take a delta"
            )
        groups.setdefault(pname, []).append((hf_name, float(scale), a, b))
    items = [item for group in groups.values() for item in group]
    finite = torch.stack([torch.isfinite(m).all() for _, _, a, b in items for m in (a, b)]).tolist() if items else []
    if not all(finite):  # one device sync for the whole adapter, not one per matrix
        hf_name = items[finite.index(False) // 2][0]
        raise ValueError(f"{hf_name}: the LoRA matrices hold NaN or inf; not merging them into the served weights")
    return groups


def plan_chunks(costs: dict[str, int], budget: int) -> list[list[str]]:
    """Split parameters, in order, into chunks whose summed cost stays within ``budget`` bytes.

    A parameter costlier than the budget gets a chunk of its own (``budget=0``: one each).

    >>> plan_chunks({"a": 3, "b": 3, "c": 5}, 6)
    [['a', 'b'], ['c']]
    """
    chunks: list[list[str]] = []
    chunk: list[str] = []
    used = 0
    for name, cost in costs.items():
        if chunk and used + cost > budget:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(name)
        used += cost
    return chunks + ([chunk] if chunk else [])


def scratch_budget() -> int:
    """Bytes of device memory the merge may use at once, from ``RFT_LORA_SCRATCH_MB``."""
    raw = os.environ.get(ENV_LORA_SCRATCH_MB, str(DEFAULT_SCRATCH_MB))
    if not raw.strip().isdigit():
        raise ValueError(f"{ENV_LORA_SCRATCH_MB}={raw!r}: give a whole number of MiB, e.g. {DEFAULT_SCRATCH_MB}")
    return int(raw) << 20


def apply_merged_lora(
    state: LoraSyncState,
    model: Any,
    targets: Iterable[Sequence],
    tensors: dict[str, torch.Tensor],
    device: torch.device,
) -> dict:
    """Serve ``bf16(W0 + scale * B @ A)`` for every target; return evidence as Python numbers.

    ``targets`` is ``[[hf_weight_name, scale], ...]``; ``tensors`` holds ``"<name>:A"`` (r x in)
    and ``"<name>:B"`` (out x r) for each. Parameters adapted by an earlier sync but absent now
    go back to their base weight. Scratch and deltas stay under ``RFT_LORA_SCRATCH_MB`` at once.
    """
    budget = scratch_budget()  # read before anything is written: a bad setting changes nothing
    params = dict(model.named_parameters())

    def resolve(hf_name: str) -> str:
        if hf_name not in state.resolved:
            state.resolved[hf_name] = resolve_vllm_param(model, hf_name, params)
        return state.resolved[hf_name]

    groups = group_targets(targets, tensors, resolve, params)
    for pname in [name for name in state.pristine if name not in groups]:
        params[pname].data.copy_(state.pristine.pop(pname).to(device))

    costs = {
        pname: params[pname].numel() * 4 + sum(b.shape[0] * a.shape[1] * 4 for _, _, a, b in items)
        for pname, items in groups.items()
    }
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # delta_sq, target_sq, changed, numel
    for chunk in plan_chunks(costs, budget):
        _merge_chunk(state, model, params, {pname: groups[pname] for pname in chunk}, device, acc)
    delta_sq, target_sq, changed, numel = acc.tolist()
    return {
        "delta_sq": delta_sq,
        "target_sq": target_sq,
        "changed": int(changed),
        "numel": int(numel),
        "params": len(groups),
    }


def _merge_chunk(
    state: LoraSyncState, model: Any, params: dict, groups: dict, device: torch.device, acc: torch.Tensor
) -> None:
    """Save-load-add for one chunk of parameters, adding its evidence to ``acc``."""
    scratch, deltas = {}, []
    for pname, items in groups.items():
        param = params[pname]
        if pname not in state.pristine:
            state.pristine[pname] = save_pristine(param.data, state.where)
        scratch[pname] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for hf_name, scale, a, b in items:
            delta = torch.matmul(b.to(device, torch.float32), a.to(device, torch.float32)).mul_(scale)
            acc[1] += torch.linalg.vector_norm(delta).double().square()
            deltas.append((hf_name, delta))
    served = {pname: params[pname].data for pname in groups}
    try:
        # the loader writes each delta's shard into a zeroed fp32 scratch, never into the weight
        for pname in groups:
            params[pname].data = scratch[pname]
        loaded = model.load_weights(weights=deltas)
    finally:
        for pname in groups:
            params[pname].data = served[pname]
    if loaded is not None and set(loaded) != set(groups):
        raise RuntimeError(
            f"apply_lora_delta: load_weights wrote {sorted(set(loaded))} but the delta scratch was set up for "
            f"{sorted(groups)}; the served model's name mapping changed, weights may be corrupt: restart the engine"
        )
    del deltas
    for pname in groups:
        base = state.pristine[pname].to(device, non_blocking=True)
        delta = scratch.pop(pname)
        merged = (base.float() + delta).to(base.dtype)
        merged = torch.where(delta == 0, base, merged)  # zero delta: W0 bit for bit (keeps -0.0)
        acc[0] += torch.linalg.vector_norm(merged.float() - base.float()).double().square()
        acc[2] += (_bits(merged) != _bits(base)).sum()
        acc[3] += merged.numel()
        served[pname].copy_(merged)


def receive_payload(worker: Any, nbytes: int, blob: Any, receive: str, device: torch.device) -> torch.Tensor:
    """The packed buffer on ``device``: from ``blob`` (``receive="bytes"``) or by the model-update
    group's broadcast from trainer rank 0 (``receive="nccl"``)."""
    if receive == "bytes":
        host = bytes_to_uint8(blob)
        if host.numel() != nbytes:
            raise ValueError(f"apply_lora_delta: got {host.numel()} payload bytes, the index says {nbytes}")
        return host.to(device, copy=True)  # aligned, writable, on the worker's device
    if receive == "nccl":
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if getattr(worker, "_model_update_with_ray", False):
            import ray.util.collective as collective

            collective.broadcast(buffer, 0, group_name=worker._model_update_group)
        else:
            worker._model_update_group.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
        return buffer
    raise ValueError(f"apply_lora_delta: receive={receive!r}; use 'bytes' or 'nccl'")


def apply_lora_delta(worker: Any, spec: Any, blob: Any = None, receive: str = "bytes") -> dict:
    """``WorkerWrap.apply_lora_delta``: merge one packed adapter into this TP rank's served weights.

    ``spec`` is the trainer's index: ``format``, ``nbytes``, ``entries`` (see :func:`pack_tensors`)
    and ``targets`` (``[[hf_weight_name, scale], ...]``). Returns this worker's evidence: seconds
    to unpack and to apply, the squared norm of ``W - W0`` over its touched shards, the squared
    fp32 norm of the full deltas, and how many touched bf16 entries differ from the base.
    """
    if not isinstance(spec, dict) or spec.get("format") != LORA_PAYLOAD_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"apply_lora_delta: payload format {found!r} is not {LORA_PAYLOAD_FORMAT!r}")
    device = worker_device(worker)
    start = time.perf_counter()  # the broadcast's wait for the trainer is transfer, not unpack
    buffer = receive_payload(worker, int(spec["nbytes"]), blob, receive, device)
    if receive == "nccl":
        start = time.perf_counter()
    tensors = unpack_tensors(buffer, spec["entries"])
    _sync(device)
    unpacked = time.perf_counter()
    with torch.no_grad():
        evidence = apply_merged_lora(sync_state(worker), worker.model_runner.model, spec["targets"], tensors, device)
    _sync(device)
    evidence["unpack_s"] = unpacked - start
    evidence["apply_s"] = time.perf_counter() - unpacked
    return evidence


def update_weight_from_ray_ref(worker: Any, name: str, dtype: str, shape: Sequence[int], blob: Any) -> list[str]:
    """``WorkerWrap.update_weight_from_ray_ref``: load one full weight whose bytes came through the
    object store. The loaded weight also becomes the base that later deltas are merged onto."""
    torch_dtype = PACKABLE_DTYPES.get(str(dtype).removeprefix("torch."))
    if torch_dtype is None:
        raise ValueError(f"update_weight_from_ray_ref: {name} has unsupported dtype {dtype}")
    weight = bytes_to_uint8(blob).to(worker_device(worker), copy=True).view(torch_dtype).view(list(shape))
    model = worker.model_runner.model
    loaded = model.load_weights(weights=[(name, weight)])
    state = getattr(worker, "_lora_sync", None)
    if state is not None and loaded:
        params = dict(model.named_parameters())
        for pname in loaded:
            if pname in state.pristine:
                state.pristine[pname] = save_pristine(params[pname].data, state.where)
    return sorted(loaded) if loaded else []
