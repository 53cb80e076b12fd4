#!/usr/bin/env python3
"""Benchmark the LoRA-delta weight sync to vLLM at gpt-oss-20b and -120b attention shapes.

Runs the shipped worker code itself: ``openrlhf/trainer/ray/vllm_worker_wrap.py`` of a
patched tree, loaded by its file path (the openrlhf package is not imported). The tree is
``--openrlhf-root DIR`` (one made by ``apply_patches.sh --export DIR``), else the installed
openrlhf, which must then be patched (``apply_patches.sh``); a worker file without the
patch is refused. The payload is packed by ``rft.openrlhf.vllm_lora_delta``, as the
trainer packs it. The served model is the tensor-parallel emulation of vLLM 0.15.1's
gpt-oss attention loading (``tests/tp_emulation.py``) at full attention shapes: 24 (20b)
or 36 (120b) layers, hidden 2880, 64 query and 8 KV heads of 64. Every LoRA target
q/k/v/o of every layer is adapted, as with
``--target_modules q_proj k_proj v_proj o_proj``.

Stages, per sync (median over repeats; the first sync, which also takes the
pristine copy of every base shard, is reported apart):

* pack      trainer rank 0: ``pack_tensors`` of all lora_A/lora_B into one buffer on
            the device, plus the copy to pinned host memory for the object store;
* transfer  the buffer's trip to a worker: with Ray, ``ray.put`` -> an engine actor
            that resolves it, turns it into bytes and msgpack-encodes the
            ``collective_rpc`` arguments -> back through the object store (the hop
            to a TP worker) -> msgpack decode; without Ray, the same conversions in
            process (msgpack, then pickle for the Ray executor hop);
* unpack    worker: bytes -> device buffer -> tensor views (slowest rank);
* apply     worker: fp32 deltas, vLLM-style sharded load into a zeroed scratch,
            ``bf16(W0 + delta)`` from the pristine copy (slowest rank).

The ZeRO-3 gather needs real trainer ranks and is not measured here: training
logs it every step as ``sync_gather_s``. Total = pack + transfer + unpack + apply.

    python bench/bench_lora_sync.py --device cuda --json-out lora_sync.json
    bash apply_patches.sh --export /tmp/tree
    python bench/bench_lora_sync.py --device cpu --models gpt-oss-20b --ranks 32 --repeats 2 --openrlhf-root /tmp/tree

Reference: the notes this project started from report about 18 s per sync for a
~96 MB adapter; the target is under 1 s for gpt-oss-20b at rank 32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import tp_emulation as emu  # noqa: E402  (tests/ holds the shared vLLM emulation)
from rft.openrlhf import vllm_lora_delta  # noqa: E402  (the payload codec, the trainer's)
from rft.patching import PatchError, find_site  # noqa: E402

REFERENCE_SECONDS = 18.0
TARGET_SECONDS = 1.0
WORKER_FILE = Path("openrlhf") / "trainer" / "ray" / "vllm_worker_wrap.py"
FIX = "run apply_patches.sh, or pass --openrlhf-root to a tree made with apply_patches.sh --export DIR"


def load_worker_module(root: Path | None = None):
    """Import ``openrlhf/trainer/ray/vllm_worker_wrap.py`` of ``root`` (default: the installed openrlhf) by its path.

    Refuses, in one line, a tree that has no such file or whose ``WorkerWrap`` lacks ``apply_lora_delta``
    (vllm_worker.patch not applied)."""
    if root is None:
        try:  # the installed openrlhf, found as apply_patches.sh finds it (without importing it)
            root = find_site(None)
        except PatchError:
            raise SystemExit(f"bench_lora_sync.py: openrlhf is not installed; {FIX}") from None
    path = Path(root) / WORKER_FILE
    if not path.is_file():
        raise SystemExit(f"bench_lora_sync.py: {path} does not exist; {FIX}")
    spec = importlib.util.spec_from_file_location("rft_bench_vllm_worker_wrap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(getattr(module, "WorkerWrap", None), "apply_lora_delta"):
        raise SystemExit(f"bench_lora_sync.py: {path} is not patched (WorkerWrap lacks apply_lora_delta); {FIX}")
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_adapter(geo: dict, rank: int, device: torch.device, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """fp32 LoRA matrices for q/k/v/o of every layer (A ~ N(0, 0.01^2), B ~ N(0, 0.01^2)), scale 2."""
    gen = torch.Generator(device=device).manual_seed(seed)
    adapter = []
    for layer in range(geo["layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            out_dim, in_dim = emu.hf_attention_shape(name, geo)
            a = torch.randn(rank, in_dim, generator=gen, device=device) * 0.01
            b = torch.randn(out_dim, rank, generator=gen, device=device) * 0.01
            adapter.append((name, a, b, 2.0))
    return adapter


class InProcessTransport:
    """The conversions of the object-store path without Ray: bytes, msgpack crossing, pickle hop."""

    name = "in-process"

    def __call__(self, host_buffer: torch.Tensor, spec: dict, tp: int):
        blob = host_buffer.numpy().tobytes()
        crossed = roundtrip([spec, blob, "bytes"])
        return pickle.loads(pickle.dumps(crossed)) if tp > 1 else crossed

    def close(self):
        pass


class RayTransport:
    """``ray.put`` -> engine actor (resolves, bytes, msgpack) -> object store -> worker (decode)."""

    name = "ray-object-store"

    def __init__(self):
        import ray

        self.ray = ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=0)
        class Engine:
            """Stands in for LLMRayActor: Ray resolved the array; bytes, then the msgpack crossing."""

            def encode(self, spec, array):
                import pickle

                blob = array.tobytes()  # what LLMRayActor.apply_lora_update hands to collective_rpc
                try:
                    import msgpack
                except ImportError:
                    return pickle.dumps([spec, blob, "bytes"], protocol=5)
                return msgpack.packb([spec, blob, "bytes"], use_bin_type=True)

        self.engine = Engine.remote()
        ray.get(self.engine.encode.remote({}, np.zeros(1, dtype=np.uint8)))  # warm up

    def __call__(self, host_buffer: torch.Tensor, spec: dict, tp: int):
        ref = self.ray.put(host_buffer.numpy())
        message = self.ray.get(self.engine.encode.remote(spec, ref))
        return decode(message)

    def close(self):
        self.ray.shutdown()


def encode(obj) -> bytes:
    if emu.msgpack is not None:
        return emu.msgpack.packb(obj, use_bin_type=True)
    return pickle.dumps(obj, protocol=5)


def decode(message: bytes):
    if emu.msgpack is not None:
        return emu.msgpack.unpackb(message, raw=False)
    return pickle.loads(message)


def roundtrip(obj):
    return decode(encode(obj))


def make_transport(kind: str):
    if kind in ("auto", "ray"):
        try:
            return RayTransport()
        except ImportError:
            if kind == "ray":
                raise SystemExit("--transport ray: ray is not installed (pip install ray)")
    return InProcessTransport()


def bench_config(wrap, geo: dict, rank: int, tp: int, device: torch.device, repeats: int, pristine: str, transport, seed=0):
    """Run ``repeats + 1`` syncs of fresh adapters through ``tp`` emulated ranks; return figures."""
    os.environ["RFT_LORA_PRISTINE"] = pristine
    checkpoint = emu.random_attention_checkpoint(geo, device=device, seed=seed)
    models = [emu.GptOssForCausalLM(geo, r, tp, torch.bfloat16, device, experts=1) for r in range(tp)]
    for model in models:
        model.load_weights(list(checkpoint.items()))
    workers = [emu.make_worker(wrap.WorkerWrap, model, device) for model in models]
    rows, host = [], None
    for step in range(repeats + 1):
        adapter = make_adapter(geo, rank, device, seed=seed + 1 + step)
        named = [(f"{n}:A", a) for n, a, _, _ in adapter] + [(f"{n}:B", b) for n, _, b, _ in adapter]
        sync(device)
        t0 = time.perf_counter()
        buffer, entries = vllm_lora_delta.pack_tensors(named)
        if host is None or host.numel() != buffer.numel():  # reused across syncs, as the trainer does
            host = torch.empty(buffer.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
        host.copy_(buffer)
        spec = {"format": vllm_lora_delta.LORA_PAYLOAD_FORMAT, "nbytes": buffer.numel(), "entries": entries,
                "targets": [[n, s] for n, _, _, s in adapter]}
        sync(device)
        t1 = time.perf_counter()
        args = transport(host, spec, tp)
        t2 = time.perf_counter()
        results = [worker.apply_lora_delta(*args) for worker in workers]
        unpack = max(r["unpack_s"] for r in results)
        apply = max(r["apply_s"] for r in results)
        changed = sum(r["changed"] for r in results) / max(sum(r["numel"] for r in results), 1)
        rows.append({"pack_s": t1 - t0, "transfer_s": t2 - t1, "unpack_s": unpack, "apply_s": apply,
                     "total_s": (t1 - t0) + (t2 - t1) + unpack + apply, "changed_frac": changed})
        del buffer, named
    exact = check_exact(models, geo, tp, checkpoint, adapter, device)
    steady = rows[1:] or rows
    figures = {key: statistics.median(row[key] for row in steady) for key in steady[0]}
    figures.update(
        first_sync_apply_s=rows[0]["apply_s"],
        adapter_mb=spec["nbytes"] / 1e6,
        n_tensors=len(entries),
        exact=exact,
        gather_s=None,
    )
    return figures


def check_exact(models, geo, tp, checkpoint, adapter, device) -> bool:
    """Layer 0 of every rank equals the shard of bf16(W0 + delta) of the last adapter, bit for bit."""
    reference = {}
    for name, a, b, scale in adapter:
        if name.startswith("model.layers.0."):
            reference[name] = (checkpoint[name].float() + (b @ a) * scale).to(torch.bfloat16)
    for r, model in enumerate(models):
        want = emu.GptOssForCausalLM(dict(geo, layers=1), r, tp, torch.bfloat16, device, experts=1)
        want.load_weights(list(reference.items()))
        for pname in ("model.layers.0.attn.qkv_proj.weight", "model.layers.0.attn.o_proj.weight"):
            if not torch.equal(model.get_parameter(pname).view(torch.int16), want.get_parameter(pname).view(torch.int16)):
                return False
    return True


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written", file=sys.stderr)
        return
    labels = [f"{r['model'].removeprefix('gpt-oss-')} r{r['rank']}\npristine {r['pristine']}" for r in results]
    stages = ("pack_s", "transfer_s", "unpack_s", "apply_s")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    bottom = [0.0] * len(results)
    for stage in stages:
        values = [r[stage] for r in results]
        ax.bar(labels, values, bottom=bottom, label=stage.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(TARGET_SECONDS, color="black", linestyle="--", linewidth=1, label=f"target {TARGET_SECONDS:g} s")
    ax.set_ylabel("seconds per sync (median)")
    ax.set_title(f"LoRA sync, {results[0]['device']} (reference notes: ~{REFERENCE_SECONDS:g} s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", nargs="+", default=list(emu.GPT_OSS_SHAPES), choices=list(emu.GPT_OSS_SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[32, 64], help="LoRA ranks (default 32 64)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks emulated per engine (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="steady-state syncs per config (default 5 cuda, 2 cpu)")
    parser.add_argument("--pristine", nargs="+", default=None, choices=["cpu", "gpu"],
                        help="where base shards are kept (default: cpu and gpu on cuda, cpu on cpu)")
    parser.add_argument("--transport", default="auto", choices=["auto", "ray", "inproc"],
                        help="auto: the Ray object store if ray imports, else in-process")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    parser.add_argument("--json-out", type=Path, default=None, help="write all figures here as JSON")
    parser.add_argument("--png", type=Path, default=None, help="stacked-bar plot of the stages (default: beside --json-out)")
    parser.add_argument("--openrlhf-root", type=Path, default=None,
                        help="directory holding a patched openrlhf package, e.g. made by apply_patches.sh --export DIR "
                             "(default: the installed openrlhf, which must be patched)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    repeats = args.repeats if args.repeats is not None else (5 if device.type == "cuda" else 2)
    pristine_modes = args.pristine or (["cpu", "gpu"] if device.type == "cuda" else ["cpu"])
    wrap = load_worker_module(args.openrlhf_root)
    transport = make_transport(args.transport)
    configs = [(m, r, p) for m in args.models for r in args.ranks for p in pristine_modes]
    try:
        from tqdm import tqdm

        configs_iter = tqdm(configs, desc="configs", file=sys.stderr)
    except ImportError:
        configs_iter = configs
    results = []
    try:
        for model, rank, pristine in configs_iter:
            geo = dict(emu.GPT_OSS_SHAPES[model])
            if args.layers:
                geo["layers"] = args.layers
            figures = bench_config(wrap, geo, rank, args.tp, device, repeats, pristine, transport)
            results.append({"model": model, "rank": rank, "pristine": pristine, "tp": args.tp, "layers": geo["layers"],
                            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "transport": transport.name, **figures})
    finally:
        transport.close()

    header = f"{'config':<26}{'MB':>7}{'pack':>8}{'transfer':>10}{'unpack':>8}{'apply':>8}{'total':>8}{'1st apply':>10}  exact"
    print(f"\nLoRA sync per stage, seconds (median of {repeats}); TP={args.tp}; transport {transport.name}; "
          f"gather not measured (ZeRO-3 ranks: sync_gather_s in training logs)")
    print(header)
    for r in results:
        name = f"{r['model']} r{r['rank']} pristine={r['pristine']}"
        print(f"{name:<26}{r['adapter_mb']:>7.1f}{r['pack_s']:>8.3f}{r['transfer_s']:>10.3f}{r['unpack_s']:>8.3f}"
              f"{r['apply_s']:>8.3f}{r['total_s']:>8.3f}{r['first_sync_apply_s']:>10.3f}  {r['exact']}")
    print(f"reference notes: ~{REFERENCE_SECONDS:g} s per sync; target < {TARGET_SECONDS:g} s for gpt-oss-20b r32")
    env = {"torch": torch.__version__, "device": results[0]["device"] if results else args.device,
           "crossing": "msgpack" if emu.msgpack is not None else "pickle (msgpack not installed)"}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_suffix(args.json_out.suffix + ".tmp")
        tmp.write_text(json.dumps({"env": env, "results": results}, indent=1))
        os.replace(tmp, args.json_out)
        print(f"wrote {args.json_out}")
    png = args.png or (args.json_out.with_suffix(".png") if args.json_out else None)
    if png and results:
        plot(results, png)
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
