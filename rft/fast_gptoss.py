"""Faster gpt-oss training and log-prob passes: routed experts and sink-aware flex attention.

transformers 4.57.6 computes gpt-oss's mixture of experts in one of two ways
(``models/gpt_oss/modeling_gpt_oss.py:81-141``): in training mode, or on the CPU,
it loops over the experts that received tokens, with a ``torch.where`` per expert
that waits for the GPU (lines 98-126); in eval mode on a GPU it runs every expert
on every token and multiplies the unrouted results by zero (lines 127-140), 8
times the routed work for the 20b's 32 experts and 32 times for the 120b's 128.
Its eager attention (lines 241-266) materialises every head's full score matrix,
for the 128-token sliding-window layers too.

This module replaces both, on the same weights and the same routing:

* :func:`routed_experts_forward` computes each token only through the experts its
  router chose, in training and eval mode alike: the (token, expert) pairs are
  sorted by expert and multiplied with ``torch._grouped_mm`` (bf16 on CUDA, no
  host sync), or with a plain loop over experts elsewhere (the CPU fallback,
  which shares the routing code);
* :func:`sink_flex_attention_forward` is ``flex_attention`` with a block mask
  (causal, sliding window, padding), so memory is linear in the sequence and the
  sliding layers compute only their window; gpt-oss's attention sinks are applied
  from the log-sum-exp flex returns, through which autograd differentiates;
* :func:`rms_norm_forward` computes each RMS norm with torch's one ``rms_norm`` operator (fused
  kernels on CUDA, forward and backward) instead of transformers' five element-wise passes
  over fp32 copies of the hidden states (``modeling_gpt_oss.py:56-61``);
* under ZeRO-3, :func:`mark_layer_leaves` makes each decoder layer one unit of
  DeepSpeed's parameter hooks (one gather and release per layer instead of one per
  submodule: a LoRA-wrapped layer has about fifty), and :func:`keep_resident` keeps a
  trained model's frozen decoder-layer weights whole on every GPU where they fit
  (:func:`resident_budget_bytes`), so that no micro step gathers them again;
* :func:`install` puts these on a loaded model (what the actor's hook calls), and
  :func:`uninstall` takes them off again. Eager attention and transformers'
  experts stay selectable: nothing changes unless :func:`install` runs, and the
  actor runs it only when ``RFT_FAST_GPTOSS`` asks for it (:func:`install_from_env`).

The attention sink of head h is a logit ``s_h`` that joins every row's softmax
and takes its share of the probability mass but has no value vector
(``eager_attention_forward``, lines 258-264). With ``lse`` the log-sum-exp of a
row's scores, a key's probability with the sink is its probability without it
times ``exp(lse) / (exp(lse) + exp(s_h)) = sigmoid(lse - s_h)``; so the output of
attention without sinks times ``sigmoid(lse - s_h)`` is the output with them.
transformers' own ``flex_attention`` does the same renormalisation
(``integrations/flex_attention.py:317-330``) but rounds ``lse`` to bf16 first
(line 315), and refuses sinks on the CPU (line 291).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rft.contract import ENV_FAST_GPTOSS, ENV_FAST_GPTOSS_RESIDENT_GIB

FAST_ATTN_IMPLEMENTATION = "rft_flex_sinks"
"""Name under which :func:`sink_flex_attention_forward` is registered with transformers'
``AttentionInterface`` (and its block-mask builder with ``AttentionMaskInterface``)."""

SETTING = ENV_FAST_GPTOSS
"""Environment variable read by :func:`install_from_env`: unset, empty or ``0`` leaves the model
as loaded; ``1`` installs every part of :data:`PARTS`; a comma-separated subset (``attention``,
``experts,attention``) installs those."""

PARTS = ("attention", "experts", "norms", "leaves", "resident")
"""What :func:`install` can change: the attention kernel, the experts, the RMS norms, and under
ZeRO-3 the granularity of DeepSpeed's parameter hooks and the residency of frozen weights."""

RESIDENT_SETTING = ENV_FAST_GPTOSS_RESIDENT_GIB
"""GiB of frozen decoder-layer weights a trained model may keep whole on each GPU (``resident``);
unset or ``auto``: :data:`RESIDENT_FRACTION` of the GPU's memory; ``0`` keeps none."""

RESIDENT_FRACTION = 0.5
"""Share of the GPU's memory that ``auto`` lets the frozen weights take. The trained model is
the one that gathers them three times a micro step (forward, recompute, backward); what must
fit beside them on a rank of the launchers' layout is the reference model's partition (a
quarter of the model at 4 ranks), one sequence's activations and logits, and DeepSpeed's
buffers: for gpt-oss-20b 36.8 GiB resident + 9.7 + about 10 fits 80 GB, and the 120b's 214 GiB
do not fit at all, so it keeps ZeRO-3's partitions."""


# Routed experts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """The (token, expert) pairs of one MoE call, sorted by expert.

    ``T`` tokens each routed to ``k`` experts give ``T * k`` pairs; pair ``p`` of the
    router's own order is token ``p // k``'s ``p % k``-th choice."""

    order: torch.Tensor
    """``[T*k]`` the router-order index of each sorted pair."""
    token: torch.Tensor
    """``[T*k]`` the token of each sorted pair."""
    expert: torch.Tensor
    """``[T*k]`` the expert of each sorted pair, ascending."""
    weight: torch.Tensor
    """``[T*k]`` the routing weight of each sorted pair (the router's softmax over its top k)."""
    ends: torch.Tensor
    """``[E]`` int32: pairs ``ends[e-1]:ends[e]`` go to expert ``e`` (the ``offs`` of ``torch._grouped_mm``)."""
    inverse: torch.Tensor
    """``[T*k]`` where each router-order pair sits in the sorted order."""


def route(router_indices: torch.Tensor, routing_weights: torch.Tensor, num_experts: int) -> Routing:
    """Sort the router's choices by expert, without waiting for the device.

    ``router_indices`` is ``[T, k]`` and ``routing_weights`` ``[T, E]``, zero off the chosen
    experts, as ``GptOssTopKRouter.forward`` returns them (``modeling_gpt_oss.py:152-158``).
    The sort is stable, so within an expert the pairs keep token order (as the loop of
    lines 104-125 visits them)."""
    top_k = router_indices.shape[1]
    flat = router_indices.reshape(-1)
    expert, order = torch.sort(flat, stable=True)
    weight = routing_weights.gather(1, router_indices).reshape(-1)[order]
    bounds = torch.arange(num_experts, device=flat.device, dtype=expert.dtype)
    ends = torch.searchsorted(expert, bounds, right=True).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return Routing(order=order, token=order // top_k, expert=expert, weight=weight, ends=ends, inverse=inverse)


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """Whether :func:`expert_matmul` runs ``torch._grouped_mm``: bf16 on a CUDA device that has it.

    Elsewhere (the CPU, other dtypes) the plain loop over experts runs instead."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def expert_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x[ends[e-1]:ends[e]] @ weights[e]`` for every expert ``e``, stacked: ``[N, K] x [E, K, M] -> [N, M]``.

    ``torch._grouped_mm`` on CUDA bf16 (one kernel, offsets read on the device); otherwise a
    loop over the experts with rows, as transformers' training loop multiplies them
    (``modeling_gpt_oss.py:117``)."""
    if uses_grouped_mm(x):
        return torch._grouped_mm(x, weights, offs=ends)
    bounds = [0, *ends.tolist()]
    pieces = [x[start:end] @ weights[e] for e, (start, end) in enumerate(zip(bounds, bounds[1:])) if end > start]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weights.shape[-1])


def gpt_oss_glu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved gate/up columns, exactly as
    ``modeling_gpt_oss.py:118-122``: ``(clamp(up) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def routed_experts(
    hidden_states: torch.Tensor,
    routing: Routing,
    gate_up_proj: torch.Tensor,
    gate_up_proj_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """The experts' weighted sum for each of ``T`` tokens, ``[T, H] -> [T, H]``, computing only routed pairs.

    Per pair the arithmetic is transformers' (``modeling_gpt_oss.py:116-124``): gate/up
    projection plus bias, :func:`gpt_oss_glu`, down projection plus bias, times the routing
    weight. The ``k`` weighted outputs of a token are then summed in one reduction (transformers
    adds them one expert at a time into a bf16 buffer, line 125); no atomics, so the result does
    not depend on thread timing."""
    tokens, hidden = hidden_states.shape
    x = hidden_states[routing.token]
    gate_up = expert_matmul(x, gate_up_proj, routing.ends) + gate_up_proj_bias[routing.expert]
    out = expert_matmul(gpt_oss_glu(gate_up, alpha, limit), down_proj, routing.ends) + down_proj_bias[routing.expert]
    weighted = (out * routing.weight[:, None]).to(hidden_states.dtype)
    top_k = routing.order.numel() // max(tokens, 1)
    return weighted[routing.inverse].view(tokens, top_k, hidden).sum(dim=1)


def routed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor
) -> torch.Tensor:
    """Drop-in ``forward`` for transformers 4.57.6's ``GptOssExperts`` (``modeling_gpt_oss.py:81``).

    Same arguments, same ``[batch, seq, hidden]`` result, same parameters read from ``self``
    (so ZeRO-3's hooks gather them as before), in training and eval mode alike."""
    batch_size = hidden_states.shape[0]
    flat = hidden_states.reshape(-1, self.hidden_size)
    routing = route(router_indices, routing_weights, routing_weights.shape[1])
    out = routed_experts(flat, routing, self.gate_up_proj, self.gate_up_proj_bias, self.down_proj,
                         self.down_proj_bias, self.alpha, self.limit)
    return out.view(batch_size, -1, self.hidden_size)


# RMS norms ---------------------------------------------------------------------------------------


def rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in ``forward`` for transformers 4.57.6's ``GptOssRMSNorm`` (``modeling_gpt_oss.py:56``).

    The same arithmetic in fp32, ``weight * x * rsqrt(mean(x^2) + eps)`` cast back to the input's
    dtype, as one ``torch.nn.functional.rms_norm`` call instead of a chain of element-wise ops."""
    hidden = hidden_states.shape[-1]
    normed = torch.nn.functional.rms_norm(hidden_states.to(torch.float32), (hidden,),
                                          self.weight.to(torch.float32), self.variance_epsilon)
    return normed.to(hidden_states.dtype)


# Sink-aware flex attention -----------------------------------------------------------------------


def flex_kernel(device_type: str) -> Callable:
    """``flex_attention`` as it can run on ``device_type``: compiled (fused Triton kernels) on CUDA.

    Elsewhere it runs uncompiled, PyTorch's reference implementation of the same operator
    (it materialises the scores, so it is for tests, not speed): torch 2.10's compiled CPU
    flex attention supports neither training nor returning the log-sum-exp."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        # as transformers compiles it for torch >= 2.7 (integrations/flex_attention.py:79)
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


_COMPILED_FLEX: Callable | None = None


def flex_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, scale: float | None):
    """``flex_attention`` returning ``(output, lse)``, lse in float32 and natural log, grouped-query aware."""
    from torch.nn.attention import flex_attention as fa

    kernel = flex_kernel(query.device.type)
    gqa = query.shape[1] != key.shape[1]
    if hasattr(fa, "AuxRequest"):  # torch >= 2.9; return_lse is deprecated there
        out, aux = kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                          return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Rescale attention output ``[B, H, L, D]`` computed without sinks to what it is with them.

    Each row is multiplied by ``sigmoid(lse - sink_h)`` (module docstring), in float32. A row
    with every key masked has ``lse = -inf`` and stays zero."""
    factor = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype)


def causal_block_mask(batch_size: int, q_len: int, kv_len: int, sliding_window: int | None, device: torch.device):
    """A causal (optionally sliding-window) block mask, for calls that bring no mask of their own.

    The window is the one of ``masking_utils.py:81-90``: key ``j`` is visible from query ``i``
    when ``i - window < j <= i``."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + offset
        if sliding_window is not None:
            visible = visible & (kv_idx > q_idx + offset - sliding_window)
        return visible

    return create_block_mask(mask_mod, B=batch_size, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device,
                             _compile=device.type == "cuda")


def sink_flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function in transformers' interface (``modeling_gpt_oss.py:326-339`` calls it).

    ``query`` is ``[B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv, S, D]``; returns ``[B, L, Hq, D]``
    like ``eager_attention_forward``, and no attention weights. ``attention_mask`` is the
    ``BlockMask`` that :func:`sink_block_mask` built for this layer type (causal, or sliding
    window for the sliding layers, with padding); without one a causal mask is built here from
    ``sliding_window``."""
    from torch.nn.attention.flex_attention import BlockMask

    if dropout > 0:
        raise ValueError(f"{FAST_ATTN_IMPLEMENTATION} has no attention dropout; got dropout={dropout}")
    if attention_mask is None:
        block_mask = causal_block_mask(query.shape[0], query.shape[2], key.shape[2], sliding_window, query.device)
    elif isinstance(attention_mask, BlockMask):
        block_mask = attention_mask
    else:
        raise TypeError(f"{FAST_ATTN_IMPLEMENTATION} needs a flex BlockMask (built by sink_block_mask), "
                        f"got {type(attention_mask).__name__}")
    out, lse = flex_with_lse(query, key, value, block_mask, scaling)
    if s_aux is not None:
        out = apply_sinks(out, lse, s_aux)
    return out.transpose(1, 2).contiguous(), None


def sink_block_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The block mask of one layer type, in transformers' mask interface.

    ``masking_utils.flex_attention_mask`` (``masking_utils.py:564-618``) with one change: the
    mask is compiled only on CUDA (on the CPU, block masks are built uncompiled, as
    :func:`flex_kernel` runs there). ``mask_function`` is causal for full-attention layers and
    causal within the window for sliding layers (``masking_utils.py:839-933``)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils as mu

    mask_function = mask_function or mu.causal_mask_function
    if attention_mask is not None:
        padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    mask_function = mu.add_offsets_to_mask_function(mask_function, cache_position[0], kv_offset)
    device = cache_position.device
    return create_block_mask(mask_function, B=batch_size, H=None, Q_LEN=cache_position.shape[0], KV_LEN=kv_length,
                             device=device, _compile=device.type == "cuda")


def register_attention() -> str:
    """Register :func:`sink_flex_attention_forward` and :func:`sink_block_mask` under
    :data:`FAST_ATTN_IMPLEMENTATION` (class-wide, ``utils/generic.py:1157``); idempotent."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FAST_ATTN_IMPLEMENTATION, sink_flex_attention_forward)
    AttentionMaskInterface.register(FAST_ATTN_IMPLEMENTATION, sink_block_mask)
    return FAST_ATTN_IMPLEMENTATION


# ZeRO-3: hooks per layer, frozen weights resident -------------------------------------------------


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

    return [m for m in model.modules() if isinstance(m, GptOssDecoderLayer)]


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has turned the model's parameters into partitions (``ds_id`` set by ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def mark_layer_leaves(model: nn.Module) -> int:
    """Make every decoder layer a ZeRO-3 leaf module; returns how many.

    DeepSpeed 0.18.5 registers its fetch and release hooks on every submodule
    (``parameter_offload.py:284-296``) and runs them before and after each one, in the forward,
    the checkpointed recompute and the backward. A gpt-oss layer with LoRA on q/k/v/o has about
    fifty submodules, most of them PEFT's dropouts and dicts without parameters. A leaf module
    (``_z3_leaf``, what ``deepspeed.utils.set_z3_leaf_modules`` sets) is fetched as one unit with
    all its parameters and its children get no hooks. The gathered set is the layer's weights,
    which its experts already are almost all of. Must run before ``deepspeed.initialize`` (the
    actor's hook does): PEFT keeps the layer objects when it wraps q/k/v/o, so the flag stays."""
    layers = _decoder_layers(model)
    for layer in layers:
        layer._z3_leaf = True
    return len(layers)


def live_ds_config() -> dict | None:
    """The DeepSpeed config transformers holds while the actor loads (``HfDeepSpeedConfig``), or None."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    return getattr(live, "config", None) if live is not None else None


def is_training_config(ds_config: Mapping | None) -> bool:
    """Whether a DeepSpeed config trains without parameter offload: OpenRLHF 0.9.3's train config
    has an ``offload_optimizer`` section and its eval config (reference, EMA model) none
    (``utils/deepspeed/deepspeed_utils.py:20-37`` and ``79-89``)."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    offload = (zero.get("offload_param") or {}).get("device", "none")
    return "offload_optimizer" in zero and offload in (None, "none")


def resident_budget_bytes(environ: Mapping[str, str], device_bytes: int) -> int:
    """Bytes of frozen weights :func:`keep_resident` may keep whole, from :data:`RESIDENT_SETTING`.

    >>> resident_budget_bytes({}, 80 * 2**30) == 40 * 2**30
    True
    >>> resident_budget_bytes({"RFT_FAST_GPTOSS_RESIDENT_GIB": "0"}, 80 * 2**30)
    0
    """
    text = environ.get(RESIDENT_SETTING, "").strip().lower()
    if text in ("", "auto"):
        return int(RESIDENT_FRACTION * device_bytes)
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"{RESIDENT_SETTING}={environ[RESIDENT_SETTING]!r}: give GiB as a number >= 0, or auto")
    return int(gib * 2**30)


def frozen_layer_params(model: nn.Module) -> list[nn.Parameter]:
    """The ZeRO-3 parameters of the decoder layers, which LoRA leaves frozen (attention projections,
    router, experts, norms, sinks). LoRA adds its own parameters after the actor's hook, so at hook
    time every layer parameter is a base weight; called later, LoRA's trainable ones are left out."""
    return [param for layer in _decoder_layers(model) for name, param in layer.named_parameters()
            if hasattr(param, "ds_id") and "lora_" not in name]


def keep_resident(params: list[nn.Parameter], budget_bytes: int) -> int:
    """Keep ``params`` whole on the GPU once gathered (``ds_persist``), if they all fit the budget; returns how many.

    ZeRO-3 frees a gathered parameter after each use unless ``ds_persist`` is set
    (``partitioned_param_coordinator.py:533-535``), so a trained model gathers its frozen weights
    three times a micro step. Persisted ones are gathered at their first use and stay; the first
    micro step, while DeepSpeed records its module trace, releases them like any other
    (``partitioned_param_coordinator.py:429-430``), and each optimizer step partitions every
    parameter (``stage3.py:2226``), after which they come back at their next use: about one gather
    an optimizer step instead of three a micro step. All or nothing: a model whose layers do not
    fit keeps every partition (the 120b on 4 ranks)."""
    total = sum(p.ds_numel * p.element_size() for p in params)
    if not params or total > budget_bytes:
        return 0
    for param in params:
        param.ds_persist = True
    return len(params)


def device_memory_bytes() -> int:
    """The current GPU's memory, or 0 without one (then nothing is kept resident)."""
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


# Installing on a model ----------------------------------------------------------------------------


def parse_setting(value: str | None) -> frozenset[str]:
    """The parts :data:`SETTING` asks for: ``""``/``0``/``off`` none, ``1``/``on``/``all`` every one,
    else a comma-separated subset of :data:`PARTS`.

    >>> sorted(parse_setting("1"))
    ['attention', 'experts', 'leaves', 'norms', 'resident']
    >>> sorted(parse_setting("experts"))
    ['experts']
    >>> parse_setting(None)
    frozenset()
    """
    text = (value or "").strip().lower()
    if text in ("", "0", "off", "false", "no"):
        return frozenset()
    if text in ("1", "on", "all", "true", "yes"):
        return frozenset(PARTS)
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"{SETTING}={value}: unknown part(s) {', '.join(unknown)}; use 0, 1 or a comma-separated "
                         f"subset of {','.join(PARTS)}")
    return parts


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return [m for m in model.modules() if isinstance(m, GptOssExperts)]


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    return [m for m in model.modules() if isinstance(m, GptOssRMSNorm)]


def install(model: nn.Module, parts: frozenset[str] | set[str] = frozenset(PARTS),
            environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Put the fast paths on a loaded gpt-oss model (bare, or inside a PEFT wrapper); returns counts.

    ``experts``: every ``GptOssExperts`` gets :func:`routed_experts_forward` as its instance's
    ``forward`` (its parameters are untouched); ``norms``: every ``GptOssRMSNorm`` gets
    :func:`rms_norm_forward`. ``attention``: the model's configs switch to
    :data:`FAST_ATTN_IMPLEMENTATION`, which ``GptOssAttention`` and the mask builders look up on
    every call (``modeling_gpt_oss.py:324-326``, ``masking_utils.py:895``). The previous
    implementation is remembered so that :func:`uninstall` restores it. ``leaves`` and
    ``resident`` act only on a ZeRO-3 partitioned model (:func:`mark_layer_leaves`;
    :func:`keep_resident` only under a training config without parameter offload, within
    :func:`resident_budget_bytes`); elsewhere they count 0."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    counts = dict.fromkeys(PARTS, 0)
    if "experts" in parts:
        for module in _experts_modules(model):
            module.forward = types.MethodType(routed_experts_forward, module)
            counts["experts"] += 1
    if "norms" in parts:
        for module in _norm_modules(model):
            module.forward = types.MethodType(rms_norm_forward, module)
            counts["norms"] += 1
    if "attention" in parts:
        register_attention()
        for pretrained in _pretrained_models(model):
            config = pretrained.config
            if config._attn_implementation != FAST_ATTN_IMPLEMENTATION:
                # kept on the module, not the config, so that a saved config.json does not carry it
                pretrained._rft_previous_attn_implementation = config._attn_implementation
                config._attn_implementation = FAST_ATTN_IMPLEMENTATION
                counts["attention"] += 1
    zero3 = is_zero3_partitioned(model)
    if "leaves" in parts and zero3:
        counts["leaves"] = mark_layer_leaves(model)
    if "resident" in parts and zero3 and is_training_config(live_ds_config()):
        counts["resident"] = keep_resident(frozen_layer_params(model),
                                           resident_budget_bytes(environ, device_memory_bytes()))
    return counts


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install`: transformers' own experts and the attention implementation set before.

    Leaves and residency are DeepSpeed's state once ``deepspeed.initialize`` has run; they stay."""
    for module in (*_experts_modules(model), *_norm_modules(model)):
        module.__dict__.pop("forward", None)
    for pretrained in _pretrained_models(model):
        previous = pretrained.__dict__.pop("_rft_previous_attn_implementation", None)
        if previous is not None:
            pretrained.config._attn_implementation = previous


def describe_install(counts: Mapping[str, int], setting: str | None) -> str:
    """One line for the actor's log: what :func:`install` changed, part by part.

    >>> describe_install({"attention": 1, "experts": 24, "norms": 49, "leaves": 24, "resident": 0}, "1")
    'rft fast gpt-oss (RFT_FAST_GPTOSS=1): attention 1, experts 24, norms 49, leaves 24, resident 0'
    """
    parts = ", ".join(f"{part} {counts.get(part, 0)}" for part in PARTS)
    return f"rft fast gpt-oss ({SETTING}={setting}): {parts}"


def install_from_env(model: nn.Module, environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """What the actor's hook calls after loading a gpt-oss model: :func:`install` the parts that
    :data:`SETTING` asks for (none by default)."""
    parts = parse_setting(environ.get(SETTING))
    if not parts:
        return dict.fromkeys(PARTS, 0)
    return install(model, parts, environ)
