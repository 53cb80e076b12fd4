"""Native LoRA in vLLM 0.15.1: the adapter is served unmerged, loaded from memory every sync.

The merged sync (:mod:`rft.openrlhf.vllm_lora_delta`) serves ``bf16(W0 + scale * B @ A)``; an
early update is far below half a bf16 step of ``W0`` and rounds away, so the engines sample
from nearly the base model while the trainer's policy has moved. Here the engine starts with
LoRA enabled and serves ``W0 x + scale * B (A x)`` through vLLM's own LoRA layers, as PEFT
computes it in the trainer (both add the LoRA output to the base layer's rounded bf16 output, so
the engine's forward matches the trainer's rather than an fp32 ideal). What this relies on in vLLM 0.15.1 (file:line in
``docs/native_lora.md``):

* A worker's adapters live in ``worker.model_runner.lora_manager`` (an
  ``LRUCacheWorkerLoRAManager``, ``v1/worker/lora_model_runner_mixin.py:41``); its
  ``_adapter_manager`` takes a ready ``LoRAModel`` (``lora/model_manager.py:824``), which
  ``LoRAModel.from_lora_tensors`` builds from tensors in memory (``lora/lora_model.py:66``).
  No file is written or read.
* A request names the adapter with ``LoRARequest(name, int_id, path)``. Before each step the
  worker "adds" every requested adapter; one whose id is already registered is only touched
  (``lora/worker_manager.py:257-284``), so the path is never read. Were it evicted, vLLM would
  try the path and fail loudly, which is why the path says it is in memory.
* vLLM packs q/k/v into ``qkv_proj`` itself (``packed_modules_mapping``,
  ``lora/model_manager.py:577``) and slices every adapter for its tensor-parallel rank when it
  copies it into its slots (``lora/layers/column_parallel_linear.py:242,320``,
  ``row_parallel_linear.py:31``), so every TP worker is given the full matrices.
* The prefix cache keys blocks on the adapter's name (``v1/core/kv_cache_utils.py:451-463``):
  each sync gets a new name and id (:func:`lora_request_for`), so no block computed with an older
  adapter is reused, and the previous adapter is removed from every worker.

The payload is the merged sync's (:func:`rft.openrlhf.lora_sync.pack_tensors`, spec
``format``/``nbytes``/``entries``/``targets``), so the trainer's half does not change; it
crosses
``collective_rpc`` as ``bytes`` for the same reason. Each target's scale is folded into its ``B``
in fp32 before the one cast to the engine's LoRA dtype, so vLLM's own scaling is 1 and one
adapter may carry per-module scales.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rft.contract import ENV_LORA_SYNC, LORA_SYNC_MODES
from rft.openrlhf.lora_sync import LORA_PAYLOAD_FORMAT, unpack_tensors

SYNC_MODES = LORA_SYNC_MODES
"""How the policy's adapter reaches the engines: served unmerged by vLLM's LoRA layers
(``native``, the default) or merged into the bf16 weights (``merged``, :mod:`vllm_lora_delta`)."""
DEFAULT_SYNC_MODE = SYNC_MODES[0]
ENV_SYNC_MODE = ENV_LORA_SYNC
"""The one setting that picks the sync mode (checked by the launcher, read once in the driver
by :func:`engine_kwargs`; an engine then knows its mode from how it was started)."""
ROLLOUT_LOGPROBS_MODE = "processed_logprobs"
"""What the engines return as each sampled token's log-prob: after temperature and top-p/k, the
distribution they sampled from (``LogprobsMode``, ``vllm/config/model.py:82-84``). The
generation-vs-training KL compares it with the trainer's log-probs at the same temperature."""

ADAPTER_NAME_PREFIX = "rft-policy-v"
"""Adapter names are this plus the sync's version: the prefix cache keys on the name."""
IN_MEMORY_PATH_PREFIX = "rft-in-memory://"
"""``LoRARequest.lora_path`` must be non-empty (``lora/request.py:37``); vLLM reads it only for an
adapter it does not hold, and this path then fails loudly instead of loading something stale."""
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM 0.15.1 accepts for ``max_lora_rank`` (``config/lora.py:25``)."""

Evidence = dict[str, float]


# ----------------------------------------------------------------------------- settings
def sync_mode(value: str | None) -> str:
    """The sync mode from the setting's raw value (None or empty: the default)."""
    mode = (value or DEFAULT_SYNC_MODE).strip().lower()
    if mode not in SYNC_MODES:
        raise ValueError(f"{ENV_SYNC_MODE}={value!r}: use one of {', '.join(SYNC_MODES)} (default {DEFAULT_SYNC_MODE})")
    return mode


def configured_mode(environ: dict[str, str] | None = None) -> str:
    """The run's sync mode, from ``RFT_LORA_SYNC`` in ``environ`` (default: this process's)."""
    return sync_mode((os.environ if environ is None else environ).get(ENV_SYNC_MODE))


def engine_kwargs(lora_rank: int, mode: str | None = None) -> dict[str, Any]:
    """``create_vllm_engines``' hook: what every engine of the run is started with beyond 0.9.3's.

    Every engine returns its sampled tokens' log-probs after temperature (``logprobs_mode``,
    ``max_logprobs=1``; 0.9.3 asks for them only with ``--enable_vllm_is_correction``) for the
    engine-vs-trainer KL. With a LoRA policy in native mode (``mode`` None: ``RFT_LORA_SYNC``)
    the engine also starts with LoRA enabled at the run's rank; in merged mode, or without LoRA,
    the engine is the one 0.9.3 starts.
    """
    kwargs: dict[str, Any] = {"logprobs_mode": ROLLOUT_LOGPROBS_MODE, "max_logprobs": 1}
    if lora_rank and lora_rank > 0 and (mode or configured_mode()) == "native":
        kwargs.update(engine_lora_kwargs(lora_rank))
    return kwargs


def engine_lora_kwargs(lora_rank: int, keep_previous: bool = False) -> dict[str, Any]:
    """What to add to the vLLM engine's arguments for native LoRA at the run's rank.

    ``max_lora_rank`` is the smallest rank vLLM accepts that holds ``lora_rank`` (its slots are
    padded to it). One adapter is served at a time; ``keep_previous`` makes room for two, for an
    engine that may still run requests of the last adapter while the next one loads (async
    training).
    """
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= lora_rank]
    if lora_rank < 1 or not fitting:
        top = VLLM_MAX_LORA_RANKS[-1]
        raise ValueError(f"--lora_rank {lora_rank}: native LoRA in vLLM 0.15.1 takes ranks 1 to {top}")
    slots = 2 if keep_previous else 1
    # one more adapter than slots may be held: the new one goes in before the old one is removed,
    # so a refused adapter leaves the current one served (the LRU cache evicts past max_cpu_loras)
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": slots, "max_cpu_loras": slots + 1}


def adapter_name(version: int) -> str:
    """The adapter's name for sync ``version`` (1, 2, ...)."""
    return f"{ADAPTER_NAME_PREFIX}{version}"


def lora_request_for(version: int | None) -> Any:
    """The ``LoRARequest`` every rollout request names after sync ``version``; None before the
    first sync (the base model, which an adapter whose B is zero also is)."""
    if version is None:
        return None
    if version < 1:
        raise ValueError(f"native LoRA version {version}: vLLM adapter ids start at 1")
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter_name(version), version, f"{IN_MEMORY_PATH_PREFIX}{adapter_name(version)}")


# ----------------------------------------------------------------------------- payload
def peft_tensor_name(engine_name: str, kind: str) -> str:
    """The PEFT file name vLLM parses (``lora/utils.py:133``) for a payload entry.

    >>> peft_tensor_name("model.layers.0.self_attn.q_proj.weight", "A")
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    if kind not in ("A", "B") or not engine_name.endswith(".weight"):
        raise ValueError(f"{engine_name}:{kind}: expected '<module>.weight' and A or B")
    return f"base_model.model.{engine_name.removesuffix('.weight')}.lora_{kind}.weight"


def adapter_tensors(
    targets: Iterable[Sequence[Any]], tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """``(PEFT-named tensors in dtype, rank, norms)`` for ``LoRAModel.from_lora_tensors``.

    Each ``B`` is multiplied by its target's scale in fp32 before the cast, so the served product
    is ``scale * B @ A`` rounded once. Every matrix is checked before anything is built: shapes
    that multiply, and finite values (an adapter holding NaN or inf would poison every rollout).
    ``norms`` holds the squared Frobenius norms of the intended fp32 products (``target_sq``) and
    of the products as the engine holds them (``served_sq``), from r x r Gram matrices.
    """
    pairs = []
    for engine_name, scale in targets:
        a, b = tensors[f"{engine_name}:A"], tensors[f"{engine_name}:B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{engine_name}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} is not a 2-D product")
        pairs.append((engine_name, float(scale), a, b))
    if not pairs:
        raise ValueError("native LoRA: the payload names no target; nothing to serve")
    finite = torch.stack([torch.isfinite(m).all() for _, _, a, b in pairs for m in (a, b)]).tolist()
    if not all(finite):  # one device sync for the whole adapter
        bad = pairs[finite.index(False) // 2][0]
        raise ValueError(f"{bad}: the LoRA matrices hold NaN or inf; not loading this adapter into the engine")
    out: dict[str, torch.Tensor] = {}
    target_sq = served_sq = 0.0
    for engine_name, scale, a, b in pairs:
        a32, b32 = a.float(), b.float().mul(scale)
        a_served, b_served = a32.to(dtype), b32.to(dtype)
        target_sq += gram_product_sq(a32, b32)
        served_sq += gram_product_sq(a_served.float(), b_served.float())
        out[peft_tensor_name(engine_name, "A")] = a_served
        out[peft_tensor_name(engine_name, "B")] = b_served
    return out, max(a.shape[0] for _, _, a, _ in pairs), {"target_sq": target_sq, "served_sq": served_sq}


def gram_product_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B @ A||_F^2`` without forming the product: ``sum((B^T B) * (A A^T))`` (r x r)."""
    return float(((b.T @ b) * (a @ a.T)).sum().double())


# ----------------------------------------------------------------------------- worker side
def lora_manager(worker: Any) -> Any:
    """The worker's ``LRUCacheWorkerLoRAManager``; a one-line error when the engine has no LoRA."""
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None:
        raise RuntimeError(
            "native LoRA sync: this vLLM engine was started without LoRA; start it with "
            "rft.openrlhf.native_lora.engine_lora_kwargs(lora_rank) or pick the merged sync"
        )
    return manager


def build_lora_model(manager: Any, lora_id: int, tensors: dict[str, torch.Tensor], rank: int) -> Any:
    """A ``LoRAModel`` from PEFT-named tensors, built as vLLM's own loader builds one
    (``lora/worker_manager.py:87-127``) minus the files: same checks, same name mapper."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    modules = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    # alpha = r: the scales are already in B (adapter_tensors), so vLLM's scaling is exactly 1
    helper = PEFTHelper.from_dict({"r": rank, "lora_alpha": rank, "target_modules": modules})
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    return LoRAModel.from_lora_tensors(
        lora_model_id=lora_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=getattr(model, "hf_to_vllm_mapper", None),
    )


def register_adapter(manager: Any, lora: Any, previous: Iterable[int]) -> list[int]:
    """Add ``lora`` to the worker, check that the engine serves every module it names, then remove
    ``previous`` adapters; returns the ids removed.

    vLLM ignores an adapter module that no LoRA layer of the model matches (``activate_adapter``
    walks the model's layers, ``lora/model_manager.py:256-266``): an adapter on gpt-oss experts, or a
    name from another model, would be dropped without a word. Such an adapter is taken back out
    and refused, and the previous one stays.
    """
    adapters = manager._adapter_manager
    if lora.id in adapters.list_adapters():
        raise ValueError(f"native LoRA: adapter id {lora.id} is already loaded; every sync needs a new id")
    adapters.add_adapter(lora)  # packs q/k/v into qkv_proj (_create_merged_loras_inplace)
    unserved = sorted(set(lora.loras) - set(adapters.modules))
    if unserved:
        adapters.remove_adapter(lora.id)
        raise ValueError(
            f"native LoRA: the engine has no LoRA layer for {unserved[:3]}"
            f"{' and more' if len(unserved) > 3 else ''}; native LoRA serves linear layers vLLM wraps "
            "(gpt-oss: attention q/k/v/o)"
        )
    removed = [old for old in previous if old != lora.id and manager.remove_adapter(old)]
    return removed


def load_native_lora(
    worker: Any, spec: Any, blob: Any, lora_id: int, keep: Sequence[int] = (), receive: str = "bytes"
) -> dict:
    """``WorkerWrap.load_lora_native``: serve one packed adapter under ``lora_id`` on this TP rank.

    ``spec`` and ``blob`` are the merged sync's payload (``bytes`` of :func:`pack_tensors`), or
    ``blob`` is None and ``receive="nccl"``: the buffer comes by the model-update group's broadcast
    from trainer rank 0, as in the merged sync (that transport needs GPUs and is untested here).
    Every adapter the worker holds other than ``lora_id`` and ``keep`` is removed once the new one
    is in. Returns this worker's evidence: the id, the number of matrices, the modules it serves,
    the squared norms of the intended and served products, and seconds to unpack and to load.
    """
    from rft.openrlhf.vllm_lora_delta import receive_payload, worker_device

    if not isinstance(spec, dict) or spec.get("format") != LORA_PAYLOAD_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"load_lora_native: payload format {found!r} is not {LORA_PAYLOAD_FORMAT!r}")
    manager = lora_manager(worker)
    start = time.perf_counter()
    # bytes are copied to a CPU buffer the adapter owns (vLLM keeps its adapters on the CPU and
    # copies them into the device slots); a broadcast lands on the worker's device
    device = worker_device(worker) if receive == "nccl" else torch.device("cpu")
    buffer = receive_payload(worker, int(spec["nbytes"]), blob, receive, device)
    if receive == "nccl":
        start = time.perf_counter()  # the broadcast's wait for the trainer is transfer, not unpack
    tensors = unpack_tensors(buffer, spec["entries"])
    unpacked = time.perf_counter()
    with torch.no_grad():
        named, rank, norms = adapter_tensors(spec["targets"], tensors, manager.lora_config.lora_dtype)
        lora = build_lora_model(manager, int(lora_id), named, rank)
        previous = [old for old in manager.list_adapters() if old not in set(keep)]
        removed = register_adapter(manager, lora, previous)
    return {
        "lora_id": int(lora_id),
        "tensors": len(named),
        "modules": len(lora.loras),
        "rank": rank,
        "target_sq": norms["target_sq"],
        "served_sq": norms["served_sq"],
        "removed": removed,
        "unpack_s": unpacked - start,
        "apply_s": time.perf_counter() - unpacked,
    }


def remove_native_lora(worker: Any, lora_id: int) -> bool:
    """``WorkerWrap.remove_lora_native``: drop adapter ``lora_id`` from this worker (True if held)."""
    return bool(lora_manager(worker).remove_adapter(int(lora_id)))


# ----------------------------------------------------------------------------- engine side
def summarize_native_evidence(results: Sequence[dict], engine_seconds: float) -> Evidence:
    """One engine's evidence from its TP workers' :func:`load_native_lora` results.

    Every worker holds the full adapter (vLLM slices it per rank), so the norms are the first
    worker's; all workers must report the same id and module count, else the ranks disagree.
    The keys are the merged sync's (:func:`rft.openrlhf.vllm_lora_delta.summarize_lora_evidence`),
    so the trainer's ``lora_sync_metrics`` reads either: ``delta_norm`` is the norm of the product
    the engine serves, and ``changed_frac`` is 1 for a non-zero adapter (``W0`` itself never
    changes in native mode).
    """
    if not results:
        raise RuntimeError("load_lora_native: the engine returned no worker results")
    ids = {r["lora_id"] for r in results}
    modules = {r["modules"] for r in results}
    if len(ids) != 1 or len(modules) != 1:
        raise RuntimeError(f"load_lora_native: TP workers disagree (ids {sorted(ids)}, modules {sorted(modules)})")
    first = results[0]
    return {
        "lora_id": float(first["lora_id"]),
        "tensors": float(first["tensors"]),
        "modules": float(first["modules"]),
        "engine_s": float(engine_seconds),
        "unpack_s": float(max(r["unpack_s"] for r in results)),
        "apply_s": float(max(r["apply_s"] for r in results)),
        "delta_norm": math.sqrt(first["served_sq"]),
        "target_norm": math.sqrt(first["target_sq"]),
        "changed_frac": 1.0 if first["served_sq"] > 0 else 0.0,
        "workers": float(len(results)),
        "prefix_cache_reset": 0.0,
    }


class NativeLoraEngine:
    """The engine's native-LoRA state: the version last loaded, and the request naming it.

    One instance per ``LLMRayActor``. :meth:`update` loads the next version on every TP worker;
    :attr:`request` is what every rollout request must carry afterwards.
    """

    def __init__(self, keep_previous: bool = False, enabled: bool = True):
        self.version: int | None = None
        self.keep_previous = keep_previous
        self.enabled = enabled

    @classmethod
    def for_engine(cls, engine_kwargs: dict[str, Any]) -> NativeLoraEngine:
        """``LLMRayActor.__init__``'s hook: native when the engine was started with LoRA
        (:func:`engine_kwargs` decided it in the driver), else a disabled state that serves the
        base weights and leaves the sync to the merged path."""
        return cls(keep_previous=int(engine_kwargs.get("max_loras") or 1) > 1, enabled=bool(engine_kwargs.get("enable_lora")))

    @property
    def request(self) -> Any:
        """The ``LoRARequest`` for the current adapter (None before the first sync, and always in
        merged mode)."""
        return lora_request_for(self.version) if self.enabled else None

    async def sync(self, llm: Any, spec: dict, payload: Any = None) -> Evidence:
        """``LLMRayActor.apply_lora_update``'s hook: the native sync when the engine serves LoRA,
        else the merged one (:func:`rft.openrlhf.vllm_lora_delta.apply_lora_update`, unchanged).
        Both return the same evidence keys, so the trainer's ``lora_sync_metrics`` reads either."""
        if self.enabled:
            evidence = await self.update(llm, spec, payload)
            print(f"rft weight sync: native LoRA, serving {adapter_name(int(evidence['lora_id']))}", flush=True)
            return evidence
        from rft.openrlhf.vllm_lora_delta import apply_lora_update

        return await apply_lora_update(llm, spec, payload)

    async def update(self, llm: Any, spec: dict, payload: Any = None) -> Evidence:
        """Load ``payload`` as the next version on every worker of ``llm`` (an ``AsyncLLMEngine``).

        ``payload`` is the packed buffer (bytes, or a uint8 array from the object store), or None
        when trainer rank 0 broadcasts it over the model-update group right after this call.
        The version moves only once every worker has taken the adapter.
        """
        from rft.openrlhf.vllm_lora_delta import payload_bytes

        start = time.perf_counter()
        version = 1 if self.version is None else self.version + 1
        keep = [self.version] if self.keep_previous and self.version is not None else []
        if payload is None:
            args = (spec, None, version, keep, "nccl")
        else:
            args = (spec, payload_bytes(payload), version, keep)
        results = await llm.collective_rpc("load_lora_native", args=args)
        self.version = version
        return summarize_native_evidence(results, time.perf_counter() - start)
