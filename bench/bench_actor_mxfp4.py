"""Time and size one patched-actor training step of gpt-oss at full layer width, on one GPU.

A random gpt-oss checkpoint with the real layer shapes of gpt-oss-20b or -120b
(hidden 2880, 32 or 128 experts of width 2880, 64 query and 8 KV heads, the
201088-token vocabulary) but only ``--layers`` layers is written with MXFP4
experts, then loaded through the patched OpenRLHF ``Actor`` under ZeRO-3
(world size 1; MXFP4 dequantized on load, CPU load then partition) with LoRA on
q/k/v/o, and trained for ``--steps`` steps of the patched ``PolicyLoss`` with
OpenRLHF's ``DeepspeedStrategy`` (bf16, FusedAdam, eager attention).

Prints, and writes to ``--json-out`` (with a PNG beside it): checkpoint size,
actor load time, host and GPU memory peaks of the load, per-step time and GPU
memory peak, tokens per second. The openrlhf imported must have the rft patches
applied (``apply_patches.sh``), or pass ``--openrlhf-root`` to a patched tree.

    python bench/bench_actor_mxfp4.py --model gpt-oss-20b --layers 2 --json-out build/actor_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "gpt-oss-20b": dict(num_local_experts=32, num_experts_per_tok=4, num_hidden_layers_full=24),
    "gpt-oss-120b": dict(num_local_experts=128, num_experts_per_tok=4, num_hidden_layers_full=36),
}
COMMON = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
    num_key_value_heads=8, sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096},
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt-oss-20b", help="layer shapes (default 20b)")
    parser.add_argument("--layers", type=int, default=2, help="layers to build (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--response", type=int, default=512, help="action tokens per sequence (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on q/k/v/o (default 8)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="as the launchers: --gradient_checkpointing --gradient_checkpointing_use_reentrant")
    parser.add_argument("--fast", nargs="?", const="1", default=None, metavar="PARTS",
                        help="set RFT_FAST_GPTOSS to PARTS (default 1, every part): the patched actor installs "
                             "rft/fast_gptoss.py's routed experts, sink-aware flex attention, ZeRO-3 layer leaves "
                             "and resident frozen weights after loading; e.g. --fast attention,experts")
    parser.add_argument("--logprob-reps", type=int, default=3,
                        help="timed log-prob forwards (eval mode, no grad) after the first (default 3)")
    parser.add_argument("--workdir", type=Path,
                        help="where the checkpoint is written (default: a temp dir); one already there is reused")
    parser.add_argument("--openrlhf-root", type=Path, help="directory holding a patched openrlhf package")
    parser.add_argument("--components", action="store_true",
                        help="after the timed steps, one step and one log-prob forward under bench/component_timer.py: "
                             "attention, router, experts, norms, the head and ZeRO-3's fetches per phase")
    parser.add_argument("--json-out", type=Path, help="write the figures here as JSON (and a PNG beside it)")
    return parser.parse_args(argv)


def single_rank_env() -> None:
    """Rank 0 of a world of one, as torchrun would set it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def build_checkpoint(dest: Path, config: dict) -> tuple[Path, int]:
    """Write the random MXFP4 checkpoint in a child process, so that its memory is not the load's."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from tiny_gptoss import build_tiny_gptoss; "
        "c = build_tiny_gptoss(sys.argv[2], mxfp4=True, seed=0, quantize_device='cuda', **json.loads(sys.argv[3])); "
        "print(sum(v.numel() for v in c.source.values()))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(dest), json.dumps(config)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_actor_mxfp4.py: building the checkpoint in {dest} failed:\n{proc.stderr[-2000:]}")
    return dest, int(proc.stdout.strip().splitlines()[-1])


def reuse_or_build_checkpoint(dest: Path, config: dict) -> tuple[Path, int]:
    """The checkpoint of ``config`` in ``dest``: reused when one built from the same config is there
    (runs that differ only in the actor's settings share it), built otherwise."""
    stamp = dest / "bench_config.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("config") == config:
        return dest, json.loads(stamp.read_text())["params"]
    path, n_params = build_checkpoint(dest, config)
    stamp.write_text(json.dumps({"config": config, "params": n_params}))
    return path, n_params


def host_peak_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def import_patched_openrlhf(root: Path | None):
    if root is not None:
        sys.path.insert(0, str(root))
    import openrlhf.models.actor as actor_mod

    if not hasattr(actor_mod, "CheckpointLoader"):  # what actor.patch imports and builds
        raise SystemExit(f"bench_actor_mxfp4.py: {actor_mod.__file__} is not patched; run apply_patches.sh "
                         f"or pass --openrlhf-root to a patched tree")
    import openrlhf.models.loss as loss_mod
    import openrlhf.utils.deepspeed.deepspeed as ds_mod

    return actor_mod, loss_mod, ds_mod


def plot(figures: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = range(1, len(figures["step_time_s"]) + 1)
    ax1.bar(steps, figures["step_time_s"], color="tab:blue")
    ax1.set(xlabel="step", ylabel="seconds", title="step time (fwd + loss + bwd + step)")
    ax2.bar(["load peak", *[f"step {s}" for s in steps]],
            [figures["load_peak_gpu_gib"], *figures["step_peak_gpu_gib"]], color="tab:orange")
    ax2.set(ylabel="GiB", title="peak GPU memory allocated")
    fig.suptitle(f"{figures['model']} width, {figures['layers']} layers, ZeRO-3 world 1, LoRA r{figures['lora_rank']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def zero3_breakdown(actor, policy_loss, strategy, optim, scheduler, inputs: tuple, old_log_probs, advantages,
                    passes: int = 3) -> dict:
    """``passes`` more training steps and log-prob forwards under ``bench/component_timer.py``, with
    DeepSpeed's ZeRO-3 fetches and releases timed too, the optimizer step on its own; every figure
    is the median over the passes."""
    import torch
    from component_timer import ComponentTimer, format_report, measure_passes

    sequences, action_mask, attention_mask = inputs
    timer = ComponentTimer(actor.model, cuda=True, zero3=True)

    def train_step() -> None:
        actor.train()
        log_probs = actor(sequences, action_mask, attention_mask)
        loss, *_ = policy_loss(log_probs, old_log_probs, advantages, action_mask=action_mask)
        timer.loss_ready()
        strategy.backward(loss, actor, optim)

    def optimizer_step() -> dict:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        strategy.optimizer_step(optim, actor, scheduler, name="actor")
        torch.cuda.synchronize()
        return {"optimizer_step_ms": (time.perf_counter() - t0) * 1e3}

    def logprob_step() -> None:
        actor.eval()
        with torch.no_grad():
            actor(sequences, action_mask, attention_mask)

    try:
        figures = measure_passes(timer, train_step, logprob_step, passes, after_train=optimizer_step)
    finally:
        timer.remove()
    train = figures["train"]
    print(format_report(train, "training step") + f"\n  optimizer step {train['optimizer_step_ms']:.1f} ms")
    print(format_report(figures["logprob"], "log-prob forward"), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_actor_mxfp4.py: needs a CUDA GPU")
    actor_mod, loss_mod, ds_mod = import_patched_openrlhf(args.openrlhf_root)
    from transformers import get_scheduler

    shape = {k: v for k, v in SHAPES[args.model].items() if k != "num_hidden_layers_full"}
    config = {**COMMON, **shape, "num_hidden_layers": args.layers}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="actor-bench-"))
    t0 = time.perf_counter()
    ckpt_path, n_params = reuse_or_build_checkpoint(workdir / "ckpt", config)
    build_s = time.perf_counter() - t0
    ckpt_gib = (ckpt_path / "model.safetensors").stat().st_size / 2**30
    print(f"checkpoint: {n_params / 1e9:.2f} B parameters, {ckpt_gib:.2f} GiB on disk (built in {build_s:.0f} s)")

    single_rank_env()
    if args.fast:
        sys.path.insert(0, str(REPO))  # the actor's hook imports rft.fast_gptoss
        os.environ["RFT_FAST_GPTOSS"] = args.fast
    strat_args = argparse.Namespace(param_dtype="bf16", local_rank=-1, zero_stage=3, adam_offload=False,
                                    offload=False, ds_tensor_parallel_size=1)
    strategy = ds_mod.DeepspeedStrategy(seed=42, max_norm=1.0, micro_train_batch_size=args.batch,
                                        train_batch_size=args.batch, zero_stage=3, args=strat_args)
    strategy.setup_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats()
    host_before = host_peak_gib()
    t0 = time.perf_counter()
    actor = actor_mod.Actor(str(ckpt_path), attn_implementation="eager", param_dtype="bf16",
                            lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS,
                            ds_config=strategy.get_ds_train_config(is_actor=True))
    load_s = time.perf_counter() - t0
    attn_used = actor.model.config._attn_implementation  # after the actor's hook, before DeepSpeed wraps the model
    experts_fast = sum("forward" in m.__dict__ for m in actor.model.modules() if type(m).__name__ == "GptOssExperts")
    load_peak_gpu = torch.cuda.max_memory_allocated() / 2**30
    load_host_peak = host_peak_gib()
    if args.gradient_checkpointing:
        actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optim = strategy.create_optimizer(actor, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    optim.param_groups = [g for g in optim.param_groups if g["params"]]  # see tests/gpu/test_gpu_lane.py
    scheduler = get_scheduler("constant", optim)
    actor, optim, scheduler = strategy.prepare((actor, optim, scheduler), is_rlhf=True)
    prepared_gpu = torch.cuda.memory_allocated() / 2**30  # weights, LoRA, Adam states: what stays between steps
    leaves = sum(bool(getattr(m, "_z3_leaf", False)) for m in actor.model.modules())
    resident = [p for p in actor.model.parameters() if getattr(p, "ds_persist", False) and p.ds_numel >= 10**5]
    print(f"actor load: {load_s:.1f} s, GPU peak {load_peak_gpu:.2f} GiB, host peak {load_host_peak:.1f} GiB "
          f"(before load {host_before:.1f} GiB)")

    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(2, config["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(args.batch, args.response, dtype=torch.bool, device=device)
    advantages = torch.randn(args.batch, args.response, generator=gen).to(device)
    with torch.no_grad():
        actor.eval()
        old_log_probs = actor(sequences, action_mask, attention_mask)
        logprob_times = []
        for _ in range(args.logprob_reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            actor(sequences, action_mask, attention_mask)
            torch.cuda.synchronize()
            logprob_times.append(time.perf_counter() - t0)
    if logprob_times:
        print(f"log-prob forward: {sorted(logprob_times)[len(logprob_times) // 2]:.3f} s (median of {len(logprob_times)})")
    policy_loss = loss_mod.PolicyLoss()
    step_times, step_peaks, losses = [], [], []
    for _ in range(args.steps):
        actor.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        log_probs = actor(sequences, action_mask, attention_mask)
        loss, *_ = policy_loss(log_probs, old_log_probs, advantages, action_mask=action_mask)
        strategy.backward(loss, actor, optim)
        strategy.optimizer_step(optim, actor, scheduler, name="actor")
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        step_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        losses.append(loss.item())
        print(f"step {len(step_times)}: {step_times[-1]:.3f} s, GPU peak {step_peaks[-1]:.2f} GiB, loss {losses[-1]:.4f}")

    components = None
    if args.components:
        try:  # the timed figures above are written whatever happens here
            components = zero3_breakdown(actor, policy_loss, strategy, optim, scheduler,
                                         (sequences, action_mask, attention_mask), old_log_probs, advantages)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and on stderr
            traceback.print_exc()
            components = {"error": f"{type(exc).__name__}: {exc}"}
    steady = sorted(step_times[1:] or step_times)[len(step_times[1:] or step_times) // 2]
    figures = {
        "model": args.model, "layers": args.layers, "layers_full_model": SHAPES[args.model]["num_hidden_layers_full"],
        "params_b": n_params / 1e9, "checkpoint_gib": ckpt_gib, "batch": args.batch, "seq": args.seq,
        "lora_rank": args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing,
        "actor_load_s": load_s, "load_peak_gpu_gib": load_peak_gpu, "load_host_peak_gib": load_host_peak,
        "step_time_s": step_times, "steady_step_time_s": steady, "step_peak_gpu_gib": step_peaks,
        "tokens_per_s": args.batch * args.seq / steady, "loss": losses,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
        "fast_gptoss": args.fast, "attn_implementation": attn_used,
        "experts_routed_layers": experts_fast, "zero3_leaf_modules": leaves,
        "resident_params": len(resident), "resident_gib": sum(p.ds_numel * p.element_size() for p in resident) / 2**30,
        "prepared_gpu_gib": prepared_gpu,
        "logprob_time_s": logprob_times,
        "steady_logprob_time_s": sorted(logprob_times)[len(logprob_times) // 2] if logprob_times else None,
        "components": components,
    }
    print(f"steady step {steady:.3f} s = {figures['tokens_per_s']:.0f} tokens/s; "
          f"peak GPU {max(step_peaks):.2f} GiB")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.json_out.parent, prefix=f".{args.json_out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(figures, f, indent=2)
        os.replace(tmp, args.json_out)
        plot(figures, args.json_out.with_suffix(".png"))
        print(f"wrote {args.json_out} and {args.json_out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
