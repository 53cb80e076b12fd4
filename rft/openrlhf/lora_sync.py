"""The trainer's half of the LoRA sync to vLLM: what ``ppo_actor.patch`` calls.

OpenRLHF 0.9.3 syncs LoRA by broadcasting every named parameter of the PEFT model
(``trainer/ray/ppo_actor.py:311-394``). vLLM has no target for those names
(``base_model.model.…``, ``lora_A``, ``base_layer``), so with ``--lora_rank > 0`` rft sends
the adapter instead, as one packed buffer per sync:

1. every trainer rank enters one ZeRO-3 ``GatheredParameters`` context over all LoRA weights
   (the same collective sequence in every transport mode, so no rank waits on another);
2. rank 0 maps each PEFT name to the base checkpoint name that vLLM's ``load_weights`` takes
   (:func:`peft_lora_to_engine`), with the PEFT layer's own scale (:func:`lora_sync_tensors`),
   and packs every ``lora_A``/``lora_B`` into one contiguous uint8 buffer with an index
   (:func:`pack_tensors`);
3. rank 0 hands the buffer over once: one ``ray.put`` when the run has no NCCL group for the
   engines (``--vllm_sync_with_ray``, or colocated models, which sync by CUDA IPC), else one
   broadcast on OpenRLHF's model-update group. Each engine's ``apply_lora_update(spec, payload)``
   merges ``bf16(W0 + scale * B @ A)`` into its tensor-parallel shards (the worker's half,
   ``vllm_worker.patch``) and returns evidence;
4. rank 0 broadcasts the sync's metrics (:data:`LORA_SYNC_METRICS`) to every rank, so that
   every rank returns, and all-reduces, the same keys; a failure on rank 0 reaches every rank
   as an exception instead of a hang.

The payload format (:func:`pack_tensors`, :func:`unpack_tensors`, :data:`LORA_PAYLOAD_FORMAT`)
is shared with the engine's half: both sides import it from here.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional, Sequence

import ray
import torch
import torch.distributed

PACK_ALIGN = 64
"""Byte alignment of every tensor in the packed buffer, so that each slice can be viewed as
any packable dtype in place (and stays aligned for vectorized copies)."""
LORA_PAYLOAD_FORMAT = "rft-lora-delta/1"
"""The ``format`` field of the sync's spec; the engine refuses any other."""
PACKABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a LoRA weight may have in the payload, by the name the index carries."""

LORA_SYNC_METRICS = (
    "sync_seconds",
    "sync_delta_norm",
    "sync_changed_frac",
    "sync_target_norm",
    "sync_gather_s",
    "sync_pack_s",
    "sync_transfer_s",
    "sync_unpack_s",
    "sync_apply_s",
)
"""The keys ``broadcast_to_vllm`` returns with LoRA, in the order rank 0 broadcasts them."""

# ----------------------------------------------------------------------------- payload format
def pack_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[list[Any]]]:
    """Pack ``[(name, tensor), ...]`` into one contiguous uint8 buffer on the tensors' device.

    Returns ``(buffer, entries)``; each entry is ``[name, dtype, shape, offset, nbytes]`` with
    plain str/int/list fields, because the index crosses msgpack (``collective_rpc``) and pickle
    unchanged where a tensor would arrive as a list. The bytes are the tensors' own bytes, so
    unpacking is bitwise exact for every dtype, NaN and -0.0 included.
    """
    entries, offset = [], 0
    for name, tensor in named_tensors:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in PACKABLE_DTYPES:
            raise ValueError(f"pack_tensors: {name} has dtype {dtype}; packable dtypes are {sorted(PACKABLE_DTYPES)}")
        nbytes = tensor.numel() * tensor.element_size()
        entries.append([name, dtype, list(tensor.shape), offset, nbytes])
        offset += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
    device = named_tensors[0][1].device if named_tensors else torch.device("cpu")
    buffer = torch.zeros(offset, dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, start, nbytes) in zip(named_tensors, entries):
        if nbytes:
            buffer[start : start + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return buffer, entries


def unpack_tensors(buffer: torch.Tensor, entries: Iterable[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Views into ``buffer`` (1-D uint8) for every index entry of :func:`pack_tensors`; no copies.

    An entry that does not fit the buffer, or names an unknown dtype, raises: a corrupt index
    must fail loudly rather than merge garbage into the served weights.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"unpack_tensors: expected a 1-D uint8 buffer, got {buffer.dtype} of shape {tuple(buffer.shape)}")
    out = {}
    for name, dtype, shape, offset, nbytes in entries:
        torch_dtype = PACKABLE_DTYPES.get(dtype)
        if torch_dtype is None:
            raise ValueError(f"unpack_tensors: {name} has unknown dtype {dtype!r}")
        numel = 1
        for dim in shape:
            numel *= int(dim)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        if numel * itemsize != nbytes or offset % PACK_ALIGN or offset + nbytes > buffer.numel():
            raise ValueError(
                f"unpack_tensors: entry {name} (offset {offset}, {nbytes} bytes, shape {shape}) does not fit "
                f"a {buffer.numel()}-byte buffer; the payload is corrupt or from another format"
            )
        out[name] = buffer[offset : offset + nbytes].view(torch_dtype).view(list(shape))
    return out


# ----------------------------------------------------------------------------- names
def is_lora_weight_name(name: str) -> bool:
    """True for PEFT LoRA matrices (``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``)."""
    return (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight")


def peft_lora_to_engine(name: str) -> tuple[str, str, str, str]:
    """Map a PEFT LoRA weight name to ``(engine weight name, "A" | "B", adapter, PEFT module path)``.

    The engine name is the base model's checkpoint name, which vLLM's ``load_weights`` takes
    (vLLM renames it further, e.g. gpt-oss ``.self_attn.`` -> ``.attn.``)::

        base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight
        -> model.layers.3.self_attn.q_proj.weight, "A", "default", base_model.model.model.layers.3.self_attn.q_proj
    """
    module, sep, rest = name.rpartition(".lora_")
    parts = rest.split(".")
    if not sep or len(parts) != 3 or parts[0] not in ("A", "B") or parts[2] != "weight":
        raise ValueError(f"{name}: not a PEFT LoRA weight (expected <module>.lora_A|lora_B.<adapter>.weight)")
    base = module.removeprefix("base_model.model.")
    return f"{base}.weight", parts[0], parts[1], module


def lora_sync_tensors(
    model: torch.nn.Module, lora_params: Sequence[tuple[str, torch.Tensor]]
) -> tuple[list[tuple[str, torch.Tensor]], list[list[Any]]]:
    """Tensors to pack (``"<engine name>:A"``, ``"<engine name>:B"``) and ``[[engine name, scale], ...]``.

    The scale is the PEFT layer's own ``scaling[adapter]`` (alpha / r, or alpha / sqrt(r) with
    rsLoRA). A non-finite LoRA weight raises: merged into bf16 weights it would silently poison
    every rollout. DoRA and fan_in_fan_out layers raise too: they are not ``scale * B @ A``.
    """
    by_target: dict[str, dict[str, Any]] = {}
    for name, param in lora_params:
        engine_name, kind, adapter, module = peft_lora_to_engine(name)
        entry = by_target.setdefault(engine_name, {"module": module, "adapter": adapter})
        if entry["adapter"] != adapter:
            raise ValueError(f"{engine_name}: adapters {entry['adapter']!r} and {adapter!r}; LoRA sync merges one adapter")
        entry[kind] = param.data
    named, targets = [], []
    for engine_name, entry in by_target.items():
        missing = [kind for kind in ("A", "B") if kind not in entry]
        if missing:
            raise ValueError(f"{engine_name}: lora_{missing[0]} is missing; cannot form B @ A")
        layer = model.get_submodule(entry["module"])
        adapter = entry["adapter"]
        if getattr(layer, "use_dora", {}).get(adapter, False) or getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"{engine_name}: DoRA and fan_in_fan_out adapters cannot be merged as scale * B @ A")
        named += [(f"{engine_name}:A", entry["A"]), (f"{engine_name}:B", entry["B"])]
        targets.append([engine_name, float(layer.scaling[adapter])])
    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).tolist() if named else []
    if not all(finite):
        bad = named[finite.index(False)][0]
        raise ValueError(f"LoRA weight {bad} holds NaN or inf; not syncing it to vLLM (training has diverged)")
    return named, targets


# ----------------------------------------------------------------------------- metrics
def lora_sync_metrics(
    results: Sequence[dict[str, float]], gather_s: float, pack_s: float, remote_s: float, total_s: float
) -> dict[str, float]:
    """Sync metrics from the engines' ``apply_lora_update`` results (every engine holds a full replica).

    ``sync_transfer_s`` is the remote round trip less the slowest engine's unpack and apply
    (never below 0); norms and the changed fraction are means over engines.
    """
    unpack = max(r["unpack_s"] for r in results)
    apply = max(r["apply_s"] for r in results)
    return {
        "sync_seconds": float(total_s),
        "sync_delta_norm": sum(r["delta_norm"] for r in results) / len(results),
        "sync_changed_frac": sum(r["changed_frac"] for r in results) / len(results),
        "sync_target_norm": sum(r["target_norm"] for r in results) / len(results),
        "sync_gather_s": float(gather_s),
        "sync_pack_s": float(pack_s),
        "sync_transfer_s": max(float(remote_s) - unpack - apply, 0.0),
        "sync_unpack_s": float(unpack),
        "sync_apply_s": float(apply),
    }


def share_from_rank0(metrics: dict[str, float], failed: bool) -> Optional[dict[str, float]]:
    """Broadcast rank 0's metrics so that every rank returns (and all-reduces) the same keys and
    values; None on every rank when rank 0 reports a failure."""
    device = torch.cuda.current_device() if torch.distributed.get_backend() == "nccl" else "cpu"
    row = [float(metrics[key]) for key in LORA_SYNC_METRICS] + [float(failed)]
    values = torch.tensor(row, dtype=torch.float64, device=device)
    torch.distributed.broadcast(values, src=0)
    shared = values.tolist()
    return None if shared[-1] else dict(zip(LORA_SYNC_METRICS, shared[:-1]))


def _cuda_sync() -> None:
    """Wait for queued kernels, so that a stage's clock covers its GPU work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gather(params: list[torch.Tensor], model: torch.nn.Module, args: Any):
    """The context that makes every LoRA weight whole on every rank (ZeRO-3, or DeepSpeed AutoTP)."""
    import deepspeed

    if getattr(args, "ds_tensor_parallel_size", 1) > 1:
        return deepspeed.module_inject.layers.GatherReplacedLayerParams(params, model, enabled=True)
    return deepspeed.zero.GatheredParameters(params, enabled=args.zero_stage == 3)


# ----------------------------------------------------------------------------- the sync
class LoraSync:
    """One trainer rank's LoRA sync: its transport, and rank 0's reusable host staging buffer."""

    def __init__(self, via_object_store: bool):
        self.via_object_store = via_object_store
        self._host: Optional[torch.Tensor] = None

    @classmethod
    def for_run(cls, args: Any, use_cuda_ipc: bool) -> Optional["LoraSync"]:
        """The run's sync, or None without ``--lora_rank`` (OpenRLHF's full-weight sync then runs).

        The buffer goes through the Ray object store with ``--vllm_sync_with_ray`` (which in
        0.9.3 means a ``ray.util.collective`` group; LoRA needs none) and when colocated (CUDA
        IPC mode creates no NCCL group); otherwise over the NCCL model-update group.
        """
        if getattr(args, "lora_rank", 0) <= 0:
            return None
        return cls(via_object_store=bool(getattr(args, "vllm_sync_with_ray", False)) or use_cuda_ipc)

    def broadcast(self, model: torch.nn.Module, args: Any, engines: Sequence[Any], group: Any = None) -> dict[str, float]:
        """Sync ``model``'s adapter to every engine; every rank returns the same :data:`LORA_SYNC_METRICS`.

        ``group`` is OpenRLHF's model-update group (rank 0 only, unused via the object store).
        Rank 0 catches its own failure and still reaches the metrics broadcast, so that the
        other ranks raise with it instead of waiting there forever.
        """
        lora_params = [(name, param) for name, param in model.named_parameters() if is_lora_weight_name(name)]
        if not lora_params:
            raise RuntimeError("--lora_rank > 0 but the actor has no lora_A/lora_B weights; check --target_modules")
        rank = torch.distributed.get_rank()
        metrics, error = dict.fromkeys(LORA_SYNC_METRICS, 0.0), None
        _cuda_sync()
        start = time.perf_counter()
        with _gather([param for _, param in lora_params], model, args):
            gathered = time.perf_counter()
            if rank == 0:
                try:
                    spec, buffer = self.pack(model, lora_params)
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the broadcast
                    error = exc
        packed = time.perf_counter()
        if rank == 0 and error is None:
            try:
                results = self._send(spec, buffer, engines, group)
                done = time.perf_counter()
                metrics = lora_sync_metrics(
                    results, gathered - start, packed - gathered, remote_s=done - packed, total_s=done - start
                )
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the broadcast
                error = exc
        shared = share_from_rank0(metrics, failed=error is not None)
        if error is not None:
            raise error
        if shared is None:
            raise RuntimeError("LoRA weight sync to vLLM failed on rank 0 (see its log); the engines may serve stale weights")
        return shared

    def pack(
        self, model: torch.nn.Module, lora_params: Sequence[tuple[str, torch.Tensor]]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Rank 0: the payload's spec and its packed buffer (staged in pinned host memory for the object store)."""
        named, targets = lora_sync_tensors(model, lora_params)
        buffer, entries = pack_tensors(named)
        if self.via_object_store and buffer.is_cuda:
            buffer = self.stage(buffer)
        _cuda_sync()
        spec = {"format": LORA_PAYLOAD_FORMAT, "nbytes": buffer.numel(), "entries": entries, "targets": targets}
        return spec, buffer

    def stage(self, buffer: torch.Tensor) -> torch.Tensor:
        """Copy ``buffer`` into one pinned host buffer, reused across syncs (the adapter's size never changes)."""
        if self._host is None or self._host.numel() != buffer.numel():
            self._host = torch.empty(buffer.shape, dtype=torch.uint8, pin_memory=True)
        return self._host.copy_(buffer)

    def _send(self, spec: dict[str, Any], buffer: torch.Tensor, engines: Sequence[Any], group: Any) -> list[dict]:
        """Rank 0: hand the buffer over once and wait for every engine's evidence.

        Each engine's ``apply_lora_update(spec, payload)`` takes the object-store reference of
        the buffer, or None when the buffer comes over the model-update group.
        """
        if self.via_object_store:
            payload = ray.put(buffer.numpy())
            refs = [engine.apply_lora_update.remote(spec, payload) for engine in engines]
        else:
            refs = [engine.apply_lora_update.remote(spec, None) for engine in engines]
            group.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
        return ray.get(refs)
