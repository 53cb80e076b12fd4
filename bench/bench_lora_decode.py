#!/usr/bin/env python3
"""Cost of native LoRA at decode: vLLM's shrink/expand pair beside the attention projections.

With native LoRA every decode step of the engine runs, for each adapted projection, a shrink
(``x @ A^T``, hidden -> rank) and an expand (``buf @ B^T`` added to the projection's output),
beside the base GEMMs it accompanies. This times both with plain torch matmuls at the decode
shapes of gpt-oss-20b (batch 64 sequences, one token each; hidden 2880; 64 query heads and 8 KV
heads of 64; q/k/v/o of 24 layers; rank 32), in the layout vLLM uses: q/k/v fused in one
``qkv_proj`` GEMM, the three shrinks of its slices as one matmul into an fp32 buffer, one expand
per slice (``vllm/lora/punica_wrapper/punica_cpu.py:265-310``; on CUDA the Triton kernels
``lora_shrink``/``lora_expand`` do the same work). ``--tp 2`` divides the shapes the way one of
rft's engines at tensor parallel 2 holds them. No vLLM is needed.

It prints one row per part (milliseconds per decode step over all layers, median of repeats)
and the LoRA pair's cost as a share of the attention projections', launched one by one and, on a
GPU, replayed from a CUDA graph as vLLM's decode runs (the graphed figure is the one to use: the
eager one is mostly the launch cost of small matmuls), and writes
``bench/results/lora_decode_<device>.json``:

    python bench/bench_lora_decode.py --device cuda
    python bench/bench_lora_decode.py --device cpu --repeats 5   # a smoke figure

The projections are only part of a decode step (attention itself, the MoE experts, the
sampler): the share printed bounds the slowdown of the whole step from above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GPT_OSS_20B = {"layers": 24, "hidden": 2880, "heads": 64, "kv_heads": 8, "head_dim": 64}
"""gpt-oss-20b's attention shapes (its config.json)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--batch", type=int, default=64, help="sequences decoded at once (default 64)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32, the 20b launcher's)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size whose one rank is timed (default 1)")
    parser.add_argument("--layers", type=int, default=GPT_OSS_20B["layers"], help="layers (default 24)")
    parser.add_argument("--repeats", type=int, default=50, help="timed decode steps (default 50)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="where to write the figures (default bench/results/lora_decode_<device>.json)")
    args = parser.parse_args(argv)
    for name in ("batch", "rank", "tp", "layers", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu for a smoke figure")
    if GPT_OSS_20B["kv_heads"] % args.tp or GPT_OSS_20B["heads"] % args.tp:
        parser.error(f"--tp {args.tp}: gpt-oss-20b's 64 query and 8 KV heads must divide evenly")
    return args


def device_tag(device: torch.device) -> str:
    """A short file-name tag for the device: ``cpu``, or the GPU model (``h100``, ``h200``, ...)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    found = re.search(r"\b([a-z]\d{2,4})\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def layer_weights(args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's bf16 projections and adapters, as one TP rank holds them (vLLM's layout)."""
    shape = GPT_OSS_20B
    q_out = shape["heads"] * shape["head_dim"] // args.tp
    kv_out = shape["kv_heads"] * shape["head_dim"] // args.tp
    hidden, o_in, r = shape["hidden"], shape["heads"] * shape["head_dim"] // args.tp, args.rank

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).to(device, torch.bfloat16)

    return {
        "qkv": rand(q_out + 2 * kv_out, hidden), "o": rand(hidden, o_in),
        "a_qkv": rand(3 * r, hidden),  # the three slices' A stacked: one shrink
        "b_q": rand(q_out, r), "b_k": rand(kv_out, r), "b_v": rand(kv_out, r),
        "a_o": rand(r, o_in), "b_o": rand(hidden, r),
        "slices": torch.tensor([q_out, kv_out, kv_out]),
    }


def base_step(x: torch.Tensor, attn: torch.Tensor, w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention projections of one layer: fused qkv, and o on the attention output."""
    return x @ w["qkv"].T, attn @ w["o"].T


def lora_step(x: torch.Tensor, attn: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, w: dict, r: int) -> None:
    """The shrink/expand pairs vLLM adds to one layer: fp32 shrink buffers, expands added in place."""
    buf = (x @ w["a_qkv"].T).float()
    start = 0
    for i, (size, b) in enumerate(zip(w["slices"].tolist(), (w["b_q"], w["b_k"], w["b_v"]))):
        qkv[:, start : start + size] += buf[:, i * r : (i + 1) * r].to(b.dtype) @ b.T
        start += size
    buf_o = (attn @ w["a_o"].T).float()
    out += buf_o.to(w["b_o"].dtype) @ w["b_o"].T


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after 5 warm-up calls (CUDA events on a GPU)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def graphed(fn, device: torch.device):
    """``fn`` captured once in a CUDA graph; returns its replay. vLLM decodes under CUDA graphs, so
    the kernels' own time counts, not the launch cost of dozens of small matmuls per layer."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    layers = [layer_weights(args, device, gen) for _ in range(args.layers)]
    hidden = GPT_OSS_20B["hidden"]
    o_in = GPT_OSS_20B["heads"] * GPT_OSS_20B["head_dim"] // args.tp
    x = (torch.randn(args.batch, hidden, generator=gen)).to(device, torch.bfloat16)
    attn = (torch.randn(args.batch, o_in, generator=gen)).to(device, torch.bfloat16)
    outs = [base_step(x, attn, w) for w in layers]

    def base() -> None:
        for w in layers:
            base_step(x, attn, w)

    def lora() -> None:
        for w, (qkv, out) in zip(layers, outs):
            lora_step(x, attn, qkv, out, w, args.rank)

    def both() -> None:
        for w in layers:
            qkv, out = base_step(x, attn, w)
            lora_step(x, attn, qkv, out, w, args.rank)

    parts = (("base", base), ("lora", lora), ("both", both))
    with torch.no_grad():
        rows = {name: timed(fn, device, args.repeats) for name, fn in parts}
        graph_rows = ({name: timed(graphed(fn, device), device, args.repeats) for name, fn in parts}
                      if device.type == "cuda" else {})
    med = {name: statistics.median(v) for name, v in rows.items()}
    graph_med = {name: statistics.median(v) for name, v in graph_rows.items()}
    r = args.rank
    flops = {
        "base": 2 * args.batch * args.layers * sum(w.numel() for w in (layers[0]["qkv"], layers[0]["o"])),
        "lora": 2 * args.batch * args.layers * (3 * r * hidden + sum(layers[0]["slices"].tolist()) * r
                                                + r * o_in + hidden * r),
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": {**GPT_OSS_20B, "layers": args.layers, "batch": args.batch, "rank": r, "tp": args.tp},
        "median_ms": med, "all_ms": rows, "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "lora_share_of_projections": med["lora"] / med["base"],
        "added_by_lora_ms": med["both"] - med["base"],
        "cuda_graph": {"median_ms": graph_med, "all_ms": graph_rows,
                       "lora_share_of_projections": graph_med["lora"] / graph_med["base"],
                       "added_by_lora_ms": graph_med["both"] - graph_med["base"]} if graph_med else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    med = result["median_ms"]
    shape = result["shape"]
    print(f"gpt-oss-20b decode, batch {shape['batch']}, rank {shape['rank']}, {shape['layers']} layers, "
          f"TP {shape['tp']} (one rank), {result['device']}; ms per decode step, median of {args.repeats}")
    print(f"{'part':<44}{'ms':>10}{'GFLOP':>10}")
    gflop = result["gflop_per_step"]
    print(f"{'attention projections (qkv_proj + o_proj)':<44}{med['base']:>10.3f}{gflop['base']:>10.2f}")
    print(f"{'LoRA shrink + expand (q, k, v, o)':<44}{med['lora']:>10.3f}{gflop['lora']:>10.2f}")
    print(f"{'both, as one step':<44}{med['both']:>10.3f}")
    print(f"LoRA pair / projections: {result['lora_share_of_projections']:.1%}; added to the step: "
          f"{result['added_by_lora_ms']:.3f} ms (eager: each matmul launched from Python)")
    graph = result["cuda_graph"]
    if graph:
        gm = graph["median_ms"]
        print(f"under a CUDA graph, as vLLM decodes: projections {gm['base']:.3f} ms, LoRA pair {gm['lora']:.3f} ms, "
              f"both {gm['both']:.3f} ms; LoRA pair / projections {graph['lora_share_of_projections']:.1%}, "
              f"added to the step {graph['added_by_lora_ms']:.3f} ms")
    out = args.json_out or REPO / "bench" / "results" / f"lora_decode_{device_tag(torch.device(args.device))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
