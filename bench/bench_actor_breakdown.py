"""Per-layer cost of a gpt-oss training step and log-prob forward: eager and transformers' experts against the fast paths.

Builds gpt-oss at the real layer width of gpt-oss-20b or -120b (hidden 2880, 64
query / 8 KV heads, 32 or 128 experts, the 201,088-token vocabulary), random
bf16 weights on the GPU, with ``--layers-lo`` and then ``--layers-hi`` layers;
LoRA on q/k/v/o through peft, reentrant gradient checkpointing and
``output_router_logits`` as OpenRLHF's ``Actor`` sets them. On one sequence of
the launchers' shape (``--seq`` tokens, the last ``--response`` of them
actions) it times, for each of four settings of ``rft/fast_gptoss.py``:

* a training step: the actor's forward (fp32 logits, log-probs of the labels as
  OpenRLHF 0.9.3 computes them without flash-attn's cross entropy), a PPO-style
  loss over the action tokens, backward (LoRA weights only get gradients);
* a log-prob forward: the same forward in eval mode under ``no_grad`` (the old
  and reference log-probs).

Per-layer figures are the difference between the two layer counts divided by
the difference in layers, so the embedding, the output head and the log-prob
arithmetic cancel. Then, on the same weights with larger attention sinks and
non-zero LoRA B matrices, it checks parity in bf16 on the GPU: log-probs and
LoRA gradients of the fast path against eager + transformers' experts, and both
against the same model in fp32 (eager, TF32 off).

No DeepSpeed here (plain transformers + peft): the patched actor under ZeRO-3
adds its per-module hooks on top (``bench/bench_actor_mxfp4.py`` measures that).

    python bench/bench_actor_breakdown.py --model gpt-oss-20b
    python bench/bench_actor_breakdown.py --model gpt-oss-120b --seq 4096 --response 3072 --lora-rank 64
    python bench/bench_actor_breakdown.py --model gpt-oss-120b --seq 4096 --response 3072 --lora-rank 64 \
        --parity-only --parity-seq 4096 --reference eager+grouped_experts

Writes ``bench/results/actor_breakdown_<model>.json`` (``--json-out`` to change),
after every measurement, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # component_timer

SHAPES = {
    "gpt-oss-20b": dict(num_local_experts=32, num_experts_per_tok=4),
    "gpt-oss-120b": dict(num_local_experts=128, num_experts_per_tok=4),
    # for a quick check of the script itself (CPU is fine): gpt-oss's structure at toy size
    "tiny": dict(num_local_experts=8, num_experts_per_tok=4, vocab_size=512, hidden_size=64, intermediate_size=64,
                 head_dim=16, num_attention_heads=8, num_key_value_heads=2, sliding_window=16),
}
COMMON = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
    num_key_value_heads=8, sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096},
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SETTINGS: dict[str, frozenset[str]] = {
    "eager+hf_experts": frozenset(),
    "eager+grouped_experts": frozenset({"experts"}),
    "flex_sinks+hf_experts": frozenset({"attention"}),
    "flex_sinks+grouped_experts": frozenset({"attention", "experts"}),
}
"""Each setting's parts of ``rft.fast_gptoss.install``; the first is what the launchers run today."""
BASELINE, FAST = "eager+hf_experts", "flex_sinks+grouped_experts"
BF16_DENSE_TFLOPS = 989.0
"""H100 SXM bf16 dense tensor-core peak from NVIDIA's datasheet, for the fraction-of-peak column."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt-oss-20b", help="layer width (default 20b)")
    parser.add_argument("--layers-lo", type=int, default=2, help="fewer layers (default 2)")
    parser.add_argument("--layers-hi", type=int, default=4, help="more layers (default 4)")
    parser.add_argument("--seq", type=int, default=5120, help="tokens in the sequence (default 5120, the launchers')")
    parser.add_argument("--response", type=int, default=4096, help="action tokens (default 4096)")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on q/k/v/o (default 32)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement (default 2)")
    parser.add_argument("--reps", type=int, default=4, help="timed calls per measurement; the median counts (default 4)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which settings to time (default all four)")
    parser.add_argument("--parity-seq", type=int, default=2048, help="tokens of the parity check (default 2048; 0 skips)")
    parser.add_argument("--parity-layers", type=int, default=2, help="layers of the parity check (default 2)")
    parser.add_argument("--reference", choices=[BASELINE, "eager+grouped_experts"], default=BASELINE,
                        help="the fp32 reference's setting (default eager + transformers' experts; in fp32 the "
                             "routed experts run their per-expert loop, which fits where transformers' eval path, "
                             "every expert on every token, does not: 120b width)")
    parser.add_argument("--parity-only", action="store_true", help="skip the timings")
    parser.add_argument("--components", action="store_true",
                        help="after the timings at --layers-hi, one more step and forward per setting under "
                             "bench/component_timer.py: attention, router, experts, norms per phase")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only to try the script)")
    parser.add_argument("--json-out", type=Path, help="default bench/results/actor_breakdown_<model>.json")
    return parser.parse_args(argv)


def build_model(name: str, layers: int, lora_rank: int, device: str, seed: int):
    """Random gpt-oss of ``name``'s width with ``layers`` layers, bf16 on ``device``, LoRA on q/k/v/o.

    As the actor loads it: norms in fp32 (``_keep_in_fp32_modules``), ``use_cache`` off,
    ``output_router_logits`` on, input grads enabled for checkpointing, reentrant checkpointing."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    shape = {**COMMON, **SHAPES[name]}
    config = GptOssConfig(**shape, num_hidden_layers=layers, attn_implementation="eager")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for module_name, module in model.named_modules():
        if module_name.endswith(("input_layernorm", "post_attention_layernorm")) or module_name == "model.norm":
            module.float()
    model.config.use_cache = False
    model.config.output_router_logits = True
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_rank, lora_alpha=2 * lora_rank,
                                             target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def make_batch(vocab: int, seq: int, response: int, device: str) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(2, vocab, (1, seq), generator=gen).to(device)
    return {"sequences": sequences, "attention_mask": torch.ones_like(sequences), "response": response,
            "advantages": torch.randn(1, response, generator=gen).to(device)}


def actor_log_probs(model, batch: dict):
    """OpenRLHF 0.9.3's ``Actor.forward`` without packing (``models/actor.py:166-204``): position ids
    from the mask, fp32 logits, log-probs of the next tokens (``models/utils.py:85-101``, the
    chunked log-sum-exp path), the last ``response`` of them."""
    import torch

    sequences, attention_mask = batch["sequences"], batch["attention_mask"]
    rolled = torch.roll(sequences, shifts=-1, dims=1)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids)["logits"].to(torch.float32)
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.gather(flat, -1, rolled.reshape(-1, 1)).squeeze(-1)
    lse = torch.zeros(flat.shape[0], device=flat.device, dtype=flat.dtype)
    for start in range(0, flat.shape[0], 1024):
        lse[start:start + 1024] = torch.logsumexp(flat[start:start + 1024], dim=-1)
    log_probs = (labels - lse).view(sequences.shape)[:, :-1]
    return log_probs[:, -batch["response"]:]


def ppo_loss(log_probs, batch: dict):
    """A PPO-style clipped loss on the action tokens (ratio 1 at the old log-probs, as in a first micro step)."""
    import torch

    ratio = torch.exp(log_probs - log_probs.detach())
    adv = batch["advantages"]
    return -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()


def train_step(model, batch: dict, timer=None):
    """Forward, :func:`ppo_loss`, backward; returns the log-probs. ``timer``: a
    :class:`component_timer.ComponentTimer` whose pass this step is, told where the forward ends."""
    model.train()
    log_probs = actor_log_probs(model, batch)
    loss = ppo_loss(log_probs, batch)
    if timer is not None:
        timer.loss_ready()
    loss.backward()
    return log_probs.detach()


def component_breakdown(model, batch: dict, device: str) -> dict:
    """Training steps and log-prob forwards under :class:`component_timer.ComponentTimer`: per-layer
    milliseconds of attention, router, experts and norms in each phase, and the head's (medians)."""
    from component_timer import ComponentTimer, format_report, measure_passes

    timer = ComponentTimer(model, cuda=device.startswith("cuda"))
    try:
        figures = measure_passes(timer, lambda: train_step(model, batch, timer), lambda: logprob_forward(model, batch),
                                 after_train=lambda: zero_grads(model))
    finally:
        timer.remove()
    print(format_report(figures["train"], "    training step"))
    print(format_report(figures["logprob"], "    log-prob forward"), flush=True)
    return figures


def logprob_forward(model, batch: dict):
    import torch

    model.eval()
    with torch.no_grad():
        return actor_log_probs(model, batch)


def timed(fn: Callable[[], object], warmup: int, reps: int, device: str) -> tuple[float, float]:
    """Median milliseconds of ``reps`` calls after ``warmup`` calls, and the peak GiB allocated during them."""
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def measure(name: str, layers: int, args: argparse.Namespace, record: Callable[[], None], out: dict) -> None:
    """Time every setting on one freshly built model of ``layers`` layers; fills ``out[setting][layers]``."""
    import torch

    from rft import fast_gptoss

    model = build_model(name, layers, args.lora_rank, args.device, seed=0)
    batch = make_batch(model.config.vocab_size, args.seq, args.response, args.device)
    for setting in args.settings:
        fast_gptoss.uninstall(model)
        fast_gptoss.install(model, SETTINGS[setting])

        def step() -> None:
            train_step(model, batch)
            zero_grads(model)

        t0 = time.perf_counter()
        train_ms, train_peak = timed(step, args.warmup, args.reps, args.device)
        lp_ms, lp_peak = timed(lambda: logprob_forward(model, batch), args.warmup, args.reps, args.device)
        figures = {"train_ms": train_ms, "logprob_ms": lp_ms, "train_peak_gib": train_peak,
                   "logprob_peak_gib": lp_peak, "wall_s": time.perf_counter() - t0}
        out.setdefault(setting, {})[str(layers)] = figures
        print(f"  {layers} layers  {setting:28s} train {train_ms:8.1f} ms  log-prob {lp_ms:8.1f} ms  "
              f"peak {train_peak:6.2f} / {lp_peak:6.2f} GiB  ({figures['wall_s']:.0f} s)", flush=True)
        if args.components and layers == args.layers_hi:
            figures["components"] = component_breakdown(model, batch, args.device)
        record()
    fast_gptoss.uninstall(model)
    del model, batch
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def lora_grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_diff(a: dict, b: dict) -> float:
    """Largest relative L2 difference over the LoRA tensors."""
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


def pin_routing(model, pins: dict, record: bool) -> list:
    """Forward hooks on every router: record its top-k choice (``record``), or replace the choice by
    the recorded one. A pinned router still computes its weights from the current hidden states
    (softmax over the pinned experts' logits, as ``GptOssTopKRouter.forward`` does over its top k,
    ``modeling_gpt_oss.py:152-158``), so gradients flow as before; only the discrete choice is fixed."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    def recorder(module, args, output):
        pins[module] = output[1].detach().clone()

    def pinned(module, args, output):
        hidden = args[0].reshape(-1, module.hidden_dim)
        logits = torch.nn.functional.linear(hidden, module.weight, module.bias)
        indices = pins[module]
        top = logits.gather(1, indices)
        top = torch.softmax(top, dim=1, dtype=top.dtype)
        return torch.zeros_like(logits).scatter_(1, indices, top), indices

    hook = recorder if record else pinned
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GptOssTopKRouter)]


def attention_alone(seq: int, device: str, sinks: list[float]) -> dict:
    """``sink_flex_attention_forward`` against transformers' ``eager_attention_forward`` on the same
    q/k/v (gpt-oss's 64 query / 8 KV heads of 64, random, scores of standard deviation about 3),
    for a full and a 128-token sliding layer: output and q/k/v gradients in bf16, both against
    eager in fp32."""
    import types

    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from rft import fast_gptoss

    heads, kv_heads, dim = 64, 8, 64
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(1, h, seq, dim, generator=gen) for h in (heads, kv_heads, kv_heads)]
    base[0] = base[0] * 3.0
    grad_out = torch.randn(1, seq, heads, dim, generator=gen)
    sink_values = torch.tensor(sinks)
    result = {}
    for window in (None, 128):
        pos = torch.arange(seq)
        visible = pos[None, :] <= pos[:, None]
        if window is not None:
            visible &= pos[None, :] > pos[:, None] - window
        outs = {}
        for label, dtype, fast in (("eager", torch.bfloat16, False), ("fast", torch.bfloat16, True),
                                   ("fp32", torch.float32, False)):
            q, k, v = (t.to(device, dtype).requires_grad_(True) for t in base)
            module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True,
                                           sinks=sink_values.to(device, dtype))
            if fast:
                out, _ = fast_gptoss.sink_flex_attention_forward(module, q, k, v, None, scaling=dim**-0.5,
                                                                  sliding_window=window, s_aux=module.sinks)
            else:
                mask = torch.zeros(seq, seq, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
                out, _ = eager_attention_forward(module, q, k, v, mask[None, None].to(device), scaling=dim**-0.5)
            grads = torch.autograd.grad(out, (q, k, v), grad_out.to(device, dtype))
            outs[label] = (out.detach().float(), [g.float() for g in grads])
            del q, k, v, out, grads

        def rel(a, b) -> float:
            return ((a - b).norm() / b.norm()).item()

        layer = {}
        for label in ("eager", "fast"):
            for other in ("fp32", "eager") if label == "fast" else ("fp32",):
                out_a, grads_a = outs[label]
                out_b, grads_b = outs[other]
                layer[f"{label}_vs_{other}"] = {"out_rel": rel(out_a, out_b),
                                                "grad_rel_qkv": [rel(a, b) for a, b in zip(grads_a, grads_b)]}
        result["full" if window is None else f"sliding_{window}"] = layer
        outs.clear()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def parity(name: str, args: argparse.Namespace) -> dict:
    """bf16 fast path against bf16 eager + transformers' experts, both against fp32 eager, on one model.

    Attention sinks are set to ``linspace(-2, 6)`` over the heads so that they carry real
    probability mass, and LoRA B to N(0, 0.02) so that LoRA A has gradients to compare. Each
    comparison runs twice: with free routing, where bf16 rounding can flip a token's top-k choice
    (a discrete change that any bf16 computation, eager included, shows against fp32), and with
    the routing pinned to one recorded choice (:func:`pin_routing`), which leaves only the
    arithmetic of attention and experts to differ."""
    import torch

    from rft import fast_gptoss

    sink_values = torch.linspace(-2.0, 6.0, COMMON["num_attention_heads"]).tolist()
    result: dict = {"seq": args.parity_seq, "layers": args.parity_layers, "sinks": "linspace(-2, 6) over heads",
                    "fp32_reference": f"{args.reference}, fp32, TF32 off",
                    "attention_alone": attention_alone(args.parity_seq, args.device, sink_values)}
    model = build_model(name, args.parity_layers, args.lora_rank, args.device, seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("sinks"):
                p.copy_(torch.tensor(sink_values[: p.numel()]))
            elif "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    batch = make_batch(model.config.vocab_size, args.parity_seq, min(args.response, args.parity_seq - 1), args.device)
    result["experts_few_tokens"] = experts_few_tokens(model, args.device)
    pins: dict = {}

    def run(parts: frozenset[str], routing: str) -> dict:
        fast_gptoss.uninstall(model)
        fast_gptoss.install(model, parts)
        handles = pin_routing(model, pins, record=not pins) if routing == "pinned" else []
        try:
            zero_grads(model)
            eval_lp = logprob_forward(model, batch)  # first, so that the pins are recorded by an eval forward
            train_lp = train_step(model, batch)
            grads = lora_grads(model)
            zero_grads(model)
        finally:
            for handle in handles:
                handle.remove()
        return {"train": train_lp, "eval": eval_lp, "grads": grads}

    def set_sinks(value: float | None) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("sinks"):
                    p.copy_(torch.tensor(sink_values[: p.numel()]) if value is None else torch.full_like(p, value))

    runs: dict = {}
    for routing in ("free", "pinned"):
        runs[routing, "eager"] = run(SETTINGS[BASELINE], routing)
        runs[routing, "fast"] = run(SETTINGS[FAST], routing)
        set_sinks(-1e4)
        runs[routing, "fast_without_sinks"] = run(SETTINGS[FAST], routing)
        set_sinks(None)
    model.float()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for routing in ("free", "pinned"):
            runs[routing, "fp32"] = run(SETTINGS[args.reference], routing)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    fast_gptoss.uninstall(model)

    def diffs(a, b) -> dict:
        d = (a.float() - b.float()).abs()
        return {"max": d.max().item(), "mean": d.mean().item()}

    for routing in ("free", "pinned"):
        r = {key[1]: value for key, value in runs.items() if key[0] == routing}
        result[f"routing_{routing}"] = {
            "logprob_eval_fast_vs_eager": diffs(r["fast"]["eval"], r["eager"]["eval"]),
            "logprob_train_fast_vs_eager": diffs(r["fast"]["train"], r["eager"]["train"]),
            "logprob_eval_eager_vs_fp32": diffs(r["eager"]["eval"], r["fp32"]["eval"]),
            "logprob_eval_fast_vs_fp32": diffs(r["fast"]["eval"], r["fp32"]["eval"]),
            "logprob_eval_fast_without_sinks_vs_eager": diffs(r["fast_without_sinks"]["eval"], r["eager"]["eval"]),
            "lora_grad_rel_fast_vs_eager": rel_diff(r["fast"]["grads"], r["eager"]["grads"]),
            "lora_grad_rel_eager_vs_fp32": rel_diff(r["eager"]["grads"], r["fp32"]["grads"]),
            "lora_grad_rel_fast_vs_fp32": rel_diff(r["fast"]["grads"], r["fp32"]["grads"]),
            "lora_grad_rel_fast_without_sinks_vs_eager": rel_diff(r["fast_without_sinks"]["grads"],
                                                                  r["eager"]["grads"]),
        }
    del model, runs
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def experts_few_tokens(model, device: str) -> dict:
    """Routed experts against transformers' training loop on a few tokens, where most experts get none
    (empty groups of the grouped GEMM): relative L2 difference of the output and of the input gradient."""
    import torch

    from rft import fast_gptoss

    mlp = model.get_base_model().model.layers[0].mlp
    result = {}
    for tokens in (1, 3, 64):
        x = torch.randn(1, tokens, model.config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        with torch.no_grad():
            scores, indices = mlp.router(x)
        mlp.experts.train()
        ref = mlp.experts(x, router_indices=indices, routing_weights=scores)
        (ref_grad,) = torch.autograd.grad(ref.float().square().sum(), x)
        out = fast_gptoss.routed_experts_forward(mlp.experts, x, indices, scores)
        (out_grad,) = torch.autograd.grad(out.float().square().sum(), x)
        result[str(tokens)] = {
            "out_rel": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
            "grad_rel": ((out_grad - ref_grad).norm() / ref_grad.norm()).item(),
            "experts_hit": int(indices.unique().numel()),
        }
    return result


def active_tflop_per_layer(name: str, seq: int) -> dict:
    """Matmul work of one layer (arithmetic, stated in the output): forward, and a checkpointed
    training step = forward + recompute + backward of activations (2 x forward; frozen weights
    need no weight gradients, LoRA's are negligible)."""
    shape = {**COMMON, **SHAPES[name]}
    h, d = shape["hidden_size"], shape["head_dim"]
    hq, hkv, inter, k = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"], shape["num_experts_per_tok"]
    proj = 2 * seq * h * (hq * d + 2 * hkv * d) + 2 * seq * hq * d * h
    experts = k * 2 * seq * (h * 2 * inter + inter * h)
    window = shape["sliding_window"]
    # causal full layer: half of seq^2; sliding layer: about seq * window; average of the two layer types
    attn_full = 2 * 2 * hq * d * seq * seq / 2
    attn_slide = 2 * 2 * hq * d * seq * min(window, seq)
    attn = (attn_full + attn_slide) / 2
    forward = (proj + experts + attn) / 1e12
    return {"forward_tflop": forward, "train_tflop": 4 * forward,
            "note": "projections + 4 routed experts + causal attention (mean of a full and a sliding layer); "
                    "train = forward + recompute + 2x for activation gradients"}


def write_json(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(figures, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def summarize(figures: dict, lo: int, hi: int) -> None:
    """Per-layer figures from the two layer counts, into ``figures`` (top-level keys of the JSON)."""
    per = figures["per_setting"]
    span = hi - lo
    train, logprob, peak = {}, {}, {}
    for setting, by_layers in per.items():
        if str(lo) in by_layers and str(hi) in by_layers:
            a, b = by_layers[str(lo)], by_layers[str(hi)]
            train[setting] = (b["train_ms"] - a["train_ms"]) / span
            logprob[setting] = (b["logprob_ms"] - a["logprob_ms"]) / span
            peak[setting] = max(b["train_peak_gib"], b["logprob_peak_gib"])
    figures.update(train_ms_per_layer=train, logprob_ms_per_layer=logprob, peak_gib=peak)
    work = figures["work_per_layer"]
    figures["train_tflops_achieved"] = {s: work["train_tflop"] / (ms / 1e3) for s, ms in train.items() if ms > 0}
    figures["logprob_tflops_achieved"] = {s: work["forward_tflop"] / (ms / 1e3) for s, ms in logprob.items() if ms > 0}
    figures["train_fraction_of_bf16_peak"] = {s: v / BF16_DENSE_TFLOPS for s, v in figures["train_tflops_achieved"].items()}
    figures["train_tokens_per_s_per_layer"] = {s: figures["seq"] / (ms / 1e3) for s, ms in train.items() if ms > 0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_actor_breakdown.py: no CUDA GPU (pass --device cpu to try the script)")
    json_out = args.json_out or REPO / "bench" / "results" / f"actor_breakdown_{args.model}.json"
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    figures: dict = {
        "gpu": gpu, "model": args.model, "seq": args.seq, "response": args.response, "lora_rank": args.lora_rank,
        "layers": [args.layers_lo, args.layers_hi], "gradient_checkpointing": "reentrant", "batch": 1,
        "torch": torch.__version__, "transformers": transformers.__version__, "settings": args.settings,
        "work_per_layer": active_tflop_per_layer(args.model, args.seq),
        "per_setting": {}, "timing": f"median of {args.reps} after {args.warmup} warm-up calls",
    }
    print(f"{args.model} width on {gpu}: seq {args.seq} ({args.response} actions), LoRA r{args.lora_rank}, "
          f"layers {args.layers_lo} and {args.layers_hi}", flush=True)

    def record() -> None:
        summarize(figures, args.layers_lo, args.layers_hi)
        write_json(json_out, figures)

    if args.parity_only:
        existing = json.loads(json_out.read_text()) if json_out.exists() else {}
        figures = {**existing, **{k: v for k, v in figures.items() if k not in existing or k in ("gpu", "torch")}}
    for layers in () if args.parity_only else (args.layers_lo, args.layers_hi):
        measure(args.model, layers, args, record, figures["per_setting"])
    record()
    print(f"\nper layer ({args.layers_hi} - {args.layers_lo} layers), {args.model} width, seq {args.seq}:")
    print(f"  {'setting':28s} {'train ms':>9s} {'log-prob ms':>12s} {'peak GiB':>9s} {'train TFLOP/s':>14s}")
    for setting in figures["train_ms_per_layer"]:
        print(f"  {setting:28s} {figures['train_ms_per_layer'][setting]:9.1f} "
              f"{figures['logprob_ms_per_layer'][setting]:12.1f} {figures['peak_gib'][setting]:9.2f} "
              f"{figures['train_tflops_achieved'].get(setting, float('nan')):14.0f}")
    if args.parity_seq > 0:
        print(f"\nparity, bf16 on {gpu}, {args.parity_layers} layers, seq {args.parity_seq}:", flush=True)
        figures["parity"] = parity(args.model, args)
        write_json(json_out, figures)
        for key, value in figures["parity"].items():
            print(f"  {key}: {value}")
    print(f"wrote {json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
