#!/usr/bin/env python3
"""Two actor ranks under ZeRO-3: MXFP4 gpt-oss load, a LoRA training step, the LoRA gather and save.

What one ZeRO-3 rank cannot show (it partitions nothing), run through the patched
OpenRLHF 0.9.3 on two processes:

1. the tiny MXFP4 gpt-oss of ``tests/tiny_gptoss.py`` is loaded by the patched
   ``openrlhf.models.Actor`` on every rank (dequantized on the CPU, then partitioned)
   with LoRA (rank 8, q/k/v/o, eager attention) and wrapped by
   ``DeepspeedStrategy.prepare``; each rank must hold its share of every partitioned
   parameter (``ds_tensor``: ceil(numel / world size) elements) and, gathered, the
   exact bf16 values the MXFP4 checkpoint decodes to;
2. training steps with the patched ``PolicyLoss`` (step time, gradient norm);
3. the actor side of the LoRA weight sync, as ``ActorPPOTrainer._broadcast_lora_to_vllm``
   does it: every rank enters one ``GatheredParameters`` context over all (partitioned)
   LoRA weights; rank 0 maps and packs them with ``lora_sync_tensors`` and
   ``pack_tensors``. The packed payload is written to ``--out`` and, with
   ``--reference DIR``, compared bit for bit with the payload of a world-size-1 run;
4. the patched ``strategy.save_model``: the directory must hold the adapter and no
   full-model weight file, the saved adapter must equal the gathered one bit for bit,
   and the bytes written are reported;
5. the patched ``strategy.save_ckpt``: no rank's model-state file may hold a frozen
   base weight (or its fragment); after one more step, ``load_ckpt`` must bring the
   saved adapter back bit for bit.

Run it on a host with two GPUs (NCCL)::

    torchrun --standalone --nproc_per_node 1 tests/gpu/two_rank_zero3.py --out build/zero3-ws1
    torchrun --standalone --nproc_per_node 2 tests/gpu/two_rank_zero3.py --out build/zero3-ws2 \\
        --reference build/zero3-ws1

or on CPU with gloo and DeepSpeed's CPU accelerator (``--backend gloo``). Figures and
check results go to ``OUT/two_rank_zero3.json`` (written by rank 0); the exit status
is 0 when every check that applies passed, 1 when one failed, 3 when a check could not
run because the patched tree lacks the code it exercises.

On the gloo path only, three CUDA calls of OpenRLHF are replaced inside this process
(``torch.cuda.set_device``, ``torch.cuda.synchronize`` and the ``"cuda"`` device type
of ``init_device_mesh`` in ``setup_distributed``), DeepSpeed's async all-gathers are
completed one by one, and flash-attn's Triton cross-entropy kernel is made unimportable,
so that OpenRLHF takes its own fallback (see ``install_cpu_shims``); and import boundaries
that cannot exist without a GPU (vLLM, flash-attn's CUDA extension) get the stand-ins of
``tests/conftest.py`` when they are not importable. No patch is changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent

RESULT_FORMAT = "rft-two-rank-zero3/1"
RESULT_NAME = "two_rank_zero3.json"
PLOT_NAME = "two_rank_zero3.png"
PAYLOAD_NAME = "lora_payload.bin"
PAYLOAD_INDEX_NAME = "lora_payload.json"
ADAPTER_DIR = "adapter"
DS_CKPT_DIR = "ds_checkpoint"
CHECKS = ("partition_share", "training_step", "mxfp4_partitioned_exact", "lora_gather", "payload_vs_reference",
          "save_adapter_only", "ds_checkpoint_resume")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_RANK, LORA_ALPHA = 8, 16
BATCH, SEQ, RESPONSE = 2, 24, 12
"""Micro-batch of every rank: 2 sequences of 24 tokens, the last 12 are the response."""
LR = 1e-3
MAX_NORM = 1.0
EXPERT_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
FULL_MODEL_PATTERNS = ("pytorch_model*.bin", "model*.safetensors", "*.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.bin", "adapter_model.safetensors")

PASSED, FAILED, SKIPPED, NOT_RUN = "passed", "failed", "skipped", "not_run"
"""Check states: SKIPPED does not apply to this run (e.g. no reference given); NOT_RUN
means the patched tree lacks the code the check exercises."""


class UsageError(Exception):
    """Bad input; reported as one line naming the fix."""


# --------------------------------------------------------------------------- pure helpers


def expected_share(numel: int, world_size: int) -> int:
    """Elements of one rank's ZeRO-3 partition of a ``numel`` tensor (DeepSpeed pads to the world size)."""
    return -(-numel // world_size)


def partition_report(shares: list[tuple[str, int, int]], world_size: int) -> dict:
    """Check one rank's partition sizes: ``shares`` is ``[(name, ds_numel, ds_tensor numel), ...]``.

    Returns the totals, the rank's fraction of all elements and the parameters whose
    partition is not ``ceil(numel / world_size)`` elements.
    """
    total = sum(numel for _, numel, _ in shares)
    local = sum(held for _, _, held in shares)
    wrong = [name for name, numel, held in shares if held != expected_share(numel, world_size)]
    return {
        "params": len(shares),
        "model_numel": total,
        "local_numel": local,
        "local_fraction": local / total if total else 0.0,
        "wrong_share": wrong,
    }


def payload_digest(buffer: bytes) -> str:
    return hashlib.sha256(buffer).hexdigest()


def compare_payloads(reference_dir: Path, buffer: bytes, index: dict) -> dict:
    """Compare a packed LoRA payload and its index with the ones a reference run wrote.

    Bitwise: the same tensors (names, dtypes, shapes, offsets), the same scales and the
    same bytes. On a difference the first differing tensor is named.
    """
    ref_buffer = (reference_dir / PAYLOAD_NAME).read_bytes()
    ref_index = json.loads((reference_dir / PAYLOAD_INDEX_NAME).read_text())
    if ref_index["entries"] != index["entries"]:
        ref_names = [e[0] for e in ref_index["entries"]]
        names = [e[0] for e in index["entries"]]
        return {"status": FAILED, "detail": f"payload index differs from the reference ({len(names)} vs {len(ref_names)} tensors)"}
    if ref_index["targets"] != index["targets"]:
        return {"status": FAILED, "detail": "LoRA targets or scales differ from the reference"}
    if ref_buffer == buffer:
        return {"status": PASSED, "detail": f"{len(buffer)} bytes, {len(index['entries'])} tensors, bitwise equal",
                "sha256": payload_digest(buffer)}
    for name, _, _, offset, nbytes in index["entries"]:
        mine, theirs = buffer[offset : offset + nbytes], ref_buffer[offset : offset + nbytes]
        if mine != theirs:
            differing = sum(a != b for a, b in zip(mine, theirs))
            return {"status": FAILED, "detail": f"{name}: {differing} of {nbytes} bytes differ from the reference"}
    return {"status": FAILED, "detail": "payload bytes differ from the reference outside every tensor (padding)"}


def directory_files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def adapter_only_report(save_dir: Path) -> dict:
    """What a LoRA ``save_model`` left in ``save_dir``: files, bytes, weight files and full-model files."""
    files = directory_files(save_dir)
    full = sorted(name for name in files for pattern in FULL_MODEL_PATTERNS if Path(name).match(pattern))
    weights = sorted(name for name in files if Path(name).name in ADAPTER_WEIGHT_FILES)
    return {
        "files": files,
        "bytes_written": sum(files.values()),
        "adapter_weight_files": weights,
        "full_model_files": full,
        "has_adapter_config": "adapter_config.json" in files,
    }


def check_from(ok: bool, detail: str) -> dict:
    return {"status": PASSED if ok else FAILED, "detail": detail}


def exit_status(checks: dict[str, dict]) -> int:
    states = {c["status"] for c in checks.values()}
    if FAILED in states:
        return 1
    if NOT_RUN in states:
        return 3
    return 0


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strip_peft(name: str) -> str:
    """PEFT parameter name -> base checkpoint name (``base_model.model.`` and ``.base_layer`` removed)."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Two ZeRO-3 actor ranks through the patched OpenRLHF 0.9.3: MXFP4 gpt-oss load, "
        "LoRA step, LoRA gather for weight sync, adapter-only save. Launch with torchrun.",
        epilog="example: torchrun --standalone --nproc_per_node 2 tests/gpu/two_rank_zero3.py --out build/zero3-ws2 "
        "--reference build/zero3-ws1",
    )
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                        help="nccl: one CUDA GPU per rank; gloo: CPU, DeepSpeed's CPU accelerator (default: nccl)")
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder for {RESULT_NAME}, the packed LoRA payload and the saved adapter")
    parser.add_argument("--reference", type=Path, default=None,
                        help="--out folder of a world-size-1 run of this script: its payload must equal this one bit for bit")
    parser.add_argument("--tree", type=Path, default=None,
                        help="a patched OpenRLHF tree (folder holding openrlhf/, e.g. from apply_patches.sh --target); "
                        "default: each rank copies the installed openrlhf 0.9.3 and applies patches/series")
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps (default 2: Adam's first step moves each LoRA B entry by about "
                        "+-lr whatever the gradient, and LoRA A not at all; the second depends on both)")
    parser.add_argument("--persistence-threshold", default="0",
                        help="stage3_param_persistence_threshold; 'auto' keeps OpenRLHF's (DeepSpeed's 1e5, "
                        "which leaves every tensor of the tiny model unpartitioned) (default 0)")
    parser.add_argument("--seed", type=int, default=42, help="seed of OpenRLHF's set_seed (default 42)")
    parser.add_argument("--timeout-min", type=float, default=10.0,
                        help="collective timeout in minutes (default 10)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.persistence_threshold != "auto":
        try:
            args.persistence_threshold = int(args.persistence_threshold)
        except ValueError:
            parser.error(f"--persistence-threshold {args.persistence_threshold!r}: give an integer or 'auto'")
    return args


def validate(args: argparse.Namespace) -> tuple[int, int, int]:
    """Check the environment and inputs before any heavy import; returns (rank, world size, local rank)."""
    missing = [key for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UsageError(f"{', '.join(missing)} not set: launch with torchrun --standalone --nproc_per_node 2 {sys.argv[0]} ...")
    if args.reference is not None:
        for name in (PAYLOAD_NAME, PAYLOAD_INDEX_NAME):
            if not (args.reference / name).is_file():
                raise UsageError(f"--reference {args.reference}: no {name}; give the --out folder of a finished world-size-1 run")
    if args.tree is not None and not (args.tree / "openrlhf" / "__init__.py").is_file():
        raise UsageError(f"--tree {args.tree}: no openrlhf/__init__.py; give a folder made by apply_patches.sh --target")
    if args.backend == "gloo":
        accel = os.environ.get("DS_ACCELERATOR", "cpu")
        if accel != "cpu":
            raise UsageError(f"--backend gloo runs on DeepSpeed's CPU accelerator, but DS_ACCELERATOR={accel}; unset it")
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=args.out, prefix=".probe.")
        probe.close()
    except OSError as err:
        raise UsageError(f"--out {args.out}: not a writable folder ({err.strerror}); pick another --out") from None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


# --------------------------------------------------------------------------- environment


def install_import_stand_ins() -> list[str]:
    """Stand-ins for import boundaries absent on this host (the ones of tests/conftest.py).

    flash-attn's CUDA extension (never called: attention is eager) and vLLM (imported at
    module level by ``openrlhf.trainer``; no engine is started here). Real modules win.
    """
    import conftest

    installed = []
    try:
        import flash_attn_2_cuda  # noqa: F401
    except ImportError:
        sys.modules["flash_attn_2_cuda"] = conftest._MissingKernel("flash_attn_2_cuda")
        installed.append("flash_attn_2_cuda")
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.modules.update(conftest.make_vllm_stub())
        installed.append("vllm")
    return installed


def install_cpu_shims(ds_module) -> list[str]:
    """CPU-test shims (gloo backend only): the CUDA calls OpenRLHF makes outside any patch.

    ``DeepspeedStrategy.setup_distributed`` calls ``torch.cuda.set_device(local_rank)`` and
    ``init_device_mesh("cuda", ...)``; ``torch_dist_barrier_and_cuda_sync`` (end of
    ``save_model``) calls ``torch.cuda.synchronize()``. On the CPU there is no device to
    select or wait for, and the mesh is built on the ``cpu`` device type over the same
    gloo group. And DeepSpeed's async all-gathers are completed one by one: ZeRO-3's coalesced
    gather launches one per parameter and waits on the last only, which CUDA stream order makes
    safe with NCCL; gloo completes async work out of order, so an earlier parameter could be read
    while still being gathered. The values gathered are unchanged. And ``log_probs_from_logits``
    (``openrlhf/models/utils.py``) imports flash-attn's Triton cross-entropy, a CUDA kernel, where
    Triton is installed (torch's wheel brings it): that import is made to raise ImportError, and
    OpenRLHF falls back to its own gather minus logsumexp, the same log-probs. Nothing else is
    replaced. Returns the modules stood in for.
    """
    import conftest
    import torch

    conftest.complete_async_gathers()  # CPU-test shim: each async gather complete before it returns
    sys.modules["flash_attn.ops.triton.cross_entropy"] = None  # CPU-test shim: import raises ImportError

    torch.cuda.set_device = lambda device: None  # CPU-test shim: no CUDA device to select
    torch.cuda.synchronize = lambda device=None: None  # CPU-test shim: no CUDA stream to wait for
    real_mesh = ds_module.init_device_mesh

    def cpu_device_mesh(device_type, *args, **kwargs):  # CPU-test shim: the mesh on "cpu"
        return real_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    ds_module.init_device_mesh = cpu_device_mesh
    return ["flash_attn.ops.triton.cross_entropy"]


def patched_tree(args: argparse.Namespace, work: Path) -> tuple[Path, list[str]]:
    """The patched OpenRLHF tree to import from, and the patches applied to it here (none with --tree)."""
    import oprl

    if args.tree is not None:
        return args.tree.resolve(), []
    root = oprl.pristine_copy(work / "site")
    return root, oprl.apply_series(root)


def import_from(root: Path, module: str):
    """Import ``module`` from the tree at ``root`` (first on sys.path); refuse any other origin."""
    mod = importlib.import_module(module)
    origin = Path(mod.__file__).resolve()
    if not origin.is_relative_to(root.resolve()):
        raise RuntimeError(f"{module} was imported from {origin}, not from {root}")
    return mod


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "deepspeed", "transformers", "peft", "openrlhf", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    found["python"] = sys.version.split()[0]
    return found


# --------------------------------------------------------------------------- the run


def strategy_args(args: argparse.Namespace) -> argparse.Namespace:
    """The DeepspeedStrategy / Actor / save_model settings train_ppo_ray.py would pass for this run."""
    return argparse.Namespace(
        param_dtype="bf16", local_rank=-1, zero_stage=3, adam_offload=False, offload=False, zpg=1,
        ds_tensor_parallel_size=1, ring_attn_size=1, use_dynamic_batch=False, overlap_comm=False,
        deepcompile=False, grad_accum_dtype=None, use_ds_universal_ckpt=False, disable_ds_ckpt=False,
        save_hf_ckpt=False, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
        lora_dropout=0.0, attn_implementation="eager", packing_samples=False, temperature=1.0,
        use_liger_kernel=False, load_in_4bit=False, seed=args.seed, full_determinism=False,
    )


def make_strategy(ds_module, args: argparse.Namespace, world_size: int):
    """OpenRLHF's DeepspeedStrategy, with the persistence threshold of this run in its train config."""
    threshold = args.persistence_threshold

    class Strategy(ds_module.DeepspeedStrategy):
        def get_ds_train_config(self, is_actor):
            config = super().get_ds_train_config(is_actor)
            if threshold != "auto":
                # Tensors under the threshold stay whole on every rank; the tiny model's are all
                # under DeepSpeed's default, gpt-oss-20b's large ones are not.
                config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
            return config

    return Strategy(
        seed=args.seed, max_norm=MAX_NORM, micro_train_batch_size=BATCH, train_batch_size=BATCH * world_size,
        zero_stage=3, args=strategy_args(args),
    )


def make_batch(vocab: int, device):
    """One fixed micro-batch, the same on every rank (left padding, one response ending early)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    sequences = torch.randint(2, vocab, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[0, :4] = 0
    sequences[0, :4] = 0
    action_mask = torch.ones(BATCH, RESPONSE, dtype=torch.bool)
    action_mask[1, -3:] = False
    advantages = torch.randn(BATCH, RESPONSE, generator=gen)
    return [t.to(device) for t in (sequences, attention_mask, action_mask, advantages)]


def expected_base_state(ckpt) -> dict:
    """The bf16 value of every base parameter that a correct dequantizing load gives."""
    import torch
    from tiny_gptoss import dequantize_mxfp4

    expected = {}
    for name, source in ckpt.source.items():
        if name.endswith(EXPERT_WEIGHTS):
            decoded = dequantize_mxfp4(ckpt.stored[f"{name}_blocks"], ckpt.stored[f"{name}_scales"])
            expected[name] = decoded.transpose(1, 2).to(torch.bfloat16)
        else:
            expected[name] = source.to(torch.bfloat16)
    return expected


def peak_memory(on_gpu: bool) -> tuple[int, str]:
    """This rank's peak memory: CUDA allocations on a GPU, resident host memory on the CPU."""
    import torch

    if on_gpu:
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return host_peak_rss(), "ru_maxrss"


def host_peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Ctx:
    """What every stage of the run needs: the patched modules, the process group and the model."""

    args: argparse.Namespace
    rank: int
    world_size: int
    on_gpu: bool
    mods: dict
    strategy: object = None
    actor: object = None
    optim: object = None
    scheduler: object = None
    batch: list = field(default_factory=list)
    old_log_probs: object = None
    log: object = print

    @property
    def peft_model(self):
        return self.actor.model.module

    def sync(self) -> None:
        """Wait for the GPU before reading a clock (nothing to wait for on the CPU)."""
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()


def lora_params(ctx: Ctx) -> list:
    """``[(name, param), ...]`` of every LoRA weight, as ``_broadcast_lora_to_vllm`` selects them."""
    from rft.openrlhf.lora_sync import is_lora_weight_name

    return [(n, p) for n, p in ctx.peft_model.named_parameters() if is_lora_weight_name(n)]


def load_and_prepare(ctx: Ctx, ckpt, figures: dict) -> object:
    """The patched Actor on the MXFP4 checkpoint, optimizer and scheduler through strategy.prepare; returns the tokenizer."""
    from transformers import get_scheduler

    strategy = ctx.strategy
    t0 = time.perf_counter()
    actor = ctx.mods["actor"].Actor(
        str(ckpt.path), attn_implementation="eager", param_dtype="bf16", lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
        ds_config=strategy.get_ds_train_config(is_actor=True),
    )
    figures["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = ctx.mods["utils"].get_tokenizer(str(ckpt.path), actor.model, "left", strategy)
    optim = strategy.create_optimizer(actor, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    # OpenRLHF always makes a no-decay group; with LoRA it is empty and ZeRO-3 drops it after
    # the scheduler counted it. torch 2.9 zips the two lists loosely, newer torch strictly (and
    # fails on the first step). The empty group holds nothing: leaving it out changes no update.
    optim.param_groups = [group for group in optim.param_groups if group["params"]]
    scheduler = get_scheduler("cosine_with_min_lr", optim, num_warmup_steps=0, num_training_steps=10,
                              scheduler_specific_kwargs={"min_lr": LR * 0.1})
    ctx.actor, ctx.optim, ctx.scheduler = strategy.prepare((actor, optim, scheduler), is_rlhf=True)
    figures["prepare_s"] = time.perf_counter() - t0
    return tokenizer


def check_partition(ctx: Ctx, figures: dict) -> dict:
    """Each rank holds ceil(numel / world size) elements of every parameter (its ``ds_tensor``)."""
    params = dict(ctx.peft_model.named_parameters())
    shares = [(n, int(p.ds_numel), int(p.ds_tensor.numel())) for n, p in params.items() if hasattr(p, "ds_tensor")]
    part = partition_report(shares, ctx.world_size)
    part["persistent"] = sum(bool(getattr(p, "ds_persist", False)) for p in params.values())
    figures["partition"] = {k: v for k, v in part.items() if k != "wrong_share"}
    if ctx.world_size == 1:
        return {"status": SKIPPED, "detail": "world size 1: ZeRO-3 partitions nothing"}
    wrong = part["wrong_share"]
    return check_from(
        len(shares) == len(params) and not wrong,
        f"rank {ctx.rank} holds {part['local_numel']} of {part['model_numel']} elements "
        f"({part['local_fraction']:.4f}; ceil(numel/{ctx.world_size}) for each of {len(shares)} of {len(params)} "
        f"parameters{'; wrong: ' + ', '.join(wrong[:3]) if wrong else ''})",
    )


def train_step(ctx: Ctx) -> tuple[float, float, float]:
    """One PPO step with the patched PolicyLoss on the fixed batch; returns (seconds, loss, global grad norm)."""
    sequences, attention_mask, action_mask, advantages = ctx.batch
    policy_loss = ctx.mods["loss"].PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)
    ctx.actor.train()
    ctx.sync()
    t0 = time.perf_counter()
    log_probs = ctx.actor(sequences, action_mask, attention_mask)
    loss, _, _, _ = policy_loss(log_probs, ctx.old_log_probs, advantages, action_mask=action_mask)
    ctx.strategy.backward(loss, ctx.actor, ctx.optim)
    ctx.strategy.optimizer_step(ctx.optim, ctx.actor, ctx.scheduler, name="actor")
    ctx.sync()
    seconds = time.perf_counter() - t0
    norm = ctx.actor.model.get_global_grad_norm()
    return seconds, float(loss.item()), float(norm) if norm is not None else float("nan")


def check_base_weights(ctx: Ctx, ckpt) -> dict:
    """Gathered, every frozen base weight is the decoded MXFP4 checkpoint, bit for bit."""
    import deepspeed
    import torch

    expected = expected_base_state(ckpt)
    base = {n: p for n, p in ctx.peft_model.named_parameters() if "lora_" not in n}
    with deepspeed.zero.GatheredParameters(list(base.values())):
        wrong = [n for n, p in base.items() if not torch.equal(p.detach().cpu(), expected[strip_peft(n)])]
    n_expert = sum(strip_peft(n).endswith(EXPERT_WEIGHTS) for n in base)
    return check_from(
        not wrong and set(map(strip_peft, base)) == set(expected) and n_expert > 0,
        f"{len(base)} base tensors ({n_expert} MXFP4 expert tensors) gathered on rank {ctx.rank} equal the decoded "
        f"checkpoint bitwise" + (f"; differ: {wrong[:3]}" if wrong else ""),
    )


def gather_payload(ctx: Ctx) -> dict:
    """The actor side of the LoRA sync, as ``_broadcast_lora_to_vllm`` does it.

    Every rank enters one ``GatheredParameters`` context over all LoRA weights; rank 0 maps
    them with ``lora_sync_tensors`` and packs them with ``pack_tensors``. Returns the payload
    (rank 0; ``None`` elsewhere), its index, timings and what each rank saw.
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from rft.openrlhf.lora_sync import lora_sync_tensors
    from rft.openrlhf.vllm_lora_delta import LORA_PAYLOAD_FORMAT, pack_tensors

    named_lora = lora_params(ctx)
    lora = [p for _, p in named_lora]
    # each LoRA tensor is a partition (nothing held whole) or, under the persistence threshold, whole everywhere
    partitioned = sum(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in lora)
    persistent = sum(bool(getattr(p, "ds_persist", False)) and p.ds_status == ZeroParamStatus.AVAILABLE for p in lora)
    out = {"buffer": None, "index": None, "tensors": len(lora), "partitioned": partitioned, "persistent": persistent}
    ctx.sync()
    t0 = time.perf_counter()
    with deepspeed.zero.GatheredParameters(lora, enabled=True):
        t1 = time.perf_counter()
        out["whole"] = all(tuple(p.shape) == tuple(p.ds_shape) for p in lora)
        # PEFT starts every lora_B at zero: a non-zero one was moved by training
        out["trained_b"] = sum(bool(p.detach().count_nonzero()) for n, p in named_lora if ".lora_B." in n)
        if ctx.rank == 0:
            named, targets = lora_sync_tensors(ctx.peft_model, named_lora)
            buffer, entries = pack_tensors(named)
            out["buffer"] = buffer.cpu().numpy().tobytes()
            out["index"] = {"format": LORA_PAYLOAD_FORMAT, "entries": entries, "targets": targets}
            ctx.sync()
    t2 = time.perf_counter()
    out["gather_s"], out["pack_s"] = t1 - t0, t2 - t1
    return out


def check_gather(ctx: Ctx, got: dict, n_layers: int) -> dict:
    n = got["tensors"]
    ok = (got["whole"] and got["trained_b"] == n // 2 and got["partitioned"] + got["persistent"] == n
          and n == 2 * len(LORA_TARGETS) * n_layers)
    if ctx.args.persistence_threshold != "auto":
        ok = ok and got["partitioned"] == n
    return check_from(
        ok,
        f"{n} LoRA tensors, {got['partitioned']} partitioned and {got['persistent']} persistent before the gather, "
        f"{'all' if got['whole'] else 'not all'} whole inside one GatheredParameters context on rank {ctx.rank}, "
        f"{got['trained_b']} of {n // 2} lora_B moved away from their zero start by training",
    )


def check_save_model(ctx: Ctx, tokenizer, save_dir: Path, payload: dict, figures: dict, result: dict) -> dict | None:
    """The patched save_model on every rank; rank 0 inspects the folder (other ranks return None)."""
    t0 = time.perf_counter()
    ctx.strategy.save_model(ctx.actor, tokenizer, str(save_dir))
    figures["save_s"] = time.perf_counter() - t0
    if ctx.rank != 0:
        return None
    report = adapter_only_report(save_dir)
    report["model_bytes"] = sum(int(p.ds_numel) * p.element_size() for p in ctx.peft_model.parameters())  # bf16
    result["save"] = report
    same, detail = saved_adapter_matches(save_dir, report, payload["buffer"], payload["index"])
    ok = not report["full_model_files"] and report["has_adapter_config"] and len(report["adapter_weight_files"]) == 1
    ctx.log(f"save_model wrote {report['bytes_written']} bytes (the model: {report['model_bytes']} bytes in bf16)")
    return check_from(
        ok and same,
        f"{report['bytes_written']} bytes in {len(report['files'])} files, weights {report['adapter_weight_files']}, "
        f"full-model files {report['full_model_files'] or 'none'}; {detail}",
    )


def inspect_ds_checkpoint(ckpt_dir: Path, trainable: set[str]) -> dict:
    """Files and bytes of a DeepSpeed checkpoint, and any frozen weight its model-state files hold."""
    import torch

    files = directory_files(ckpt_dir)
    leaked = []
    for name in files:
        if name.endswith("model_states.pt"):
            state = torch.load(ckpt_dir / name, map_location="cpu", weights_only=False)
            extra = set(state["module"]) - trainable - set(state.get("buffer_names") or [])
            fragments = state.get("frozen_param_fragments") or {}
            leaked += [f"{name}: {len(extra)} frozen module entries"] if extra else []
            leaked += [f"{name}: {len(fragments)} frozen fragments"] if fragments else []
    return {"files": files, "bytes_written": sum(files.values()), "frozen_leaks": leaked}


def check_ds_checkpoint(ctx: Ctx, ckpt_dir: Path, payload: dict, figures: dict, result: dict) -> dict:
    """save_ckpt holds no frozen weight; after one more step, load_ckpt brings back the saved adapter bit for bit."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    ctx.strategy.save_ckpt(ctx.actor.model, str(ckpt_dir), tag="rft_two_rank", max_num=3, max_mem=1000)
    figures["ckpt_save_s"] = time.perf_counter() - t0
    dist.barrier()
    report = None
    if ctx.rank == 0:
        trainable = {n for n, p in ctx.peft_model.named_parameters() if p.requires_grad}
        report = inspect_ds_checkpoint(ckpt_dir, trainable)
        result["ds_checkpoint"] = report
    train_step(ctx)
    moved = gather_payload(ctx)
    t0 = time.perf_counter()
    ctx.strategy.load_ckpt(ctx.actor.model, str(ckpt_dir), tag="rft_two_rank")
    figures["ckpt_load_s"] = time.perf_counter() - t0
    resumed = gather_payload(ctx)
    if ctx.rank != 0:
        return {"status": PASSED, "detail": f"rank {ctx.rank} saved and loaded its partition"}
    ok = not report["frozen_leaks"] and moved["buffer"] != payload["buffer"] and resumed["buffer"] == payload["buffer"]
    ctx.log(f"save_ckpt wrote {report['bytes_written']} bytes in {len(report['files'])} files")
    return check_from(
        ok,
        f"{report['bytes_written']} bytes in {len(report['files'])} files, frozen weights "
        f"{report['frozen_leaks'] or 'none'}; one more step {'changed' if moved['buffer'] != payload['buffer'] else 'did not change'} "
        f"the adapter, load_ckpt brought back {'the saved one bitwise' if resumed['buffer'] == payload['buffer'] else 'a different one'}",
    )


def run(args: argparse.Namespace, rank: int, world_size: int, work: Path) -> int:
    sys.path.insert(0, str(TESTS))
    import torch

    on_gpu = args.backend == "nccl"
    if on_gpu and not torch.cuda.is_available():
        raise UsageError("--backend nccl needs a CUDA GPU per rank; none is visible (use --backend gloo on CPU)")
    if not on_gpu:
        # The same thread count in the reference and the two-rank run, so that CPU kernels
        # reduce in the same order (torchrun sets OMP_NUM_THREADS=1 only for several ranks).
        torch.set_num_threads(1)
    stand_ins = install_import_stand_ins()

    import oprl
    from tiny_gptoss import build_tiny_gptoss

    root, series = patched_tree(args, work)
    # purge the openrlhf imported so far (oprl imports the installed one), put root first on sys.path
    mods = {"ds": oprl.load(root, "openrlhf.utils.deepspeed.deepspeed")}
    for key, module in (("actor", "openrlhf.models.actor"), ("loss", "openrlhf.models.loss"), ("utils", "openrlhf.utils"),
                        ("ppo_actor", "openrlhf.trainer.ray.ppo_actor"),
                        ("worker_wrap", "openrlhf.trainer.ray.vllm_worker_wrap")):
        mods[key] = import_from(root, module)
    import deepspeed
    import torch.distributed as dist

    # what each patch puts in its file and uses there (the helpers this script calls come from rft.openrlhf)
    missing = {
        "actor": [n for n in ("CheckpointLoader",) if not hasattr(mods["actor"], n)],
        "lora_sync": [n for n in ("LoraSync",) if not hasattr(mods["ppo_actor"], n)]
        + [f"WorkerWrap.{n}" for n in ("apply_lora_delta",) if not hasattr(mods["worker_wrap"].WorkerWrap, n)],
        "save_model": [n for n in ("_gather_trainable", "_adapter_only", "_load_without_frozen") if not hasattr(mods["ds"], n)],
    }

    # Each rank writes the same deterministic checkpoint to its own folder (before any seeding).
    ckpt = build_tiny_gptoss(work / "tiny-gptoss-mxfp4", mxfp4=True, seed=0)

    if not on_gpu:
        stand_ins += install_cpu_shims(mods["ds"])
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=args.timeout_min))
    ctx = Ctx(args=args, rank=rank, world_size=world_size, on_gpu=on_gpu, mods=mods)
    ctx.strategy = make_strategy(mods["ds"], args, world_size)
    ctx.strategy.setup_distributed(timeout=timedelta(minutes=args.timeout_min))
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, torchrun said {rank} of {world_size}")
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    ctx.log = (lambda msg: print(f"[two_rank_zero3] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    ctx.log(f"world size {world_size}, backend {dist.get_backend()}, device {device}, tree {root}, "
            f"stand-ins {stand_ins or 'none'}")

    checks: dict[str, dict] = {}
    figures: dict = {"rank": rank}
    result: dict = {
        "format": RESULT_FORMAT, "backend": args.backend, "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "versions": versions(), "import_stand_ins": stand_ins,
        # with --tree, the given tree was patched beforehand: its patches are those of patches/series then
        "tree": str(root) if args.tree is not None else None, "applied_here": series,
        "series": series or oprl.series_names(),
        "settings": {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": LORA_TARGETS,
                     "steps": args.steps, "micro_batch": BATCH, "seq_len": SEQ, "response_len": RESPONSE,
                     "lr": LR, "max_norm": MAX_NORM, "seed": args.seed,
                     "persistence_threshold": args.persistence_threshold, "checkpoint_config": ckpt.config},
    }
    if missing["actor"]:
        detail = f"openrlhf.models.actor lacks {missing['actor']} (actor.patch)"
        for name in CHECKS:
            checks[name] = {"status": NOT_RUN, "detail": detail}
        return finish(args, rank, world_size, result, checks, figures, device)

    # 1. the patched Actor loads the MXFP4 checkpoint on every rank, ZeRO-3 partitions it
    tokenizer = load_and_prepare(ctx, ckpt, figures)
    checks["partition_share"] = check_partition(ctx, figures)

    # 2. training steps with the patched PolicyLoss
    ctx.batch = make_batch(ckpt.config["vocab_size"], device)
    sequences, attention_mask, action_mask, _ = ctx.batch
    with torch.no_grad():
        ctx.actor.eval()
        ctx.old_log_probs = ctx.actor(sequences, action_mask, attention_mask)
    steps = [train_step(ctx) for _ in range(args.steps)]
    figures["step_s"] = [s for s, _, _ in steps]
    result["loss"], result["grad_norm"] = [l for _, l, _ in steps], [g for _, _, g in steps]
    checks["training_step"] = check_from(
        all(math.isfinite(v) for v in result["loss"] + result["grad_norm"]) and all(g > 0 for g in result["grad_norm"]),
        f"{args.steps} steps, loss {result['loss']}, global grad norm {result['grad_norm']} (clipped above {MAX_NORM})",
    )
    ctx.log(f"steps: {', '.join(f'{s:.3f}s' for s in figures['step_s'])}; loss {result['loss']}")
    checks["mxfp4_partitioned_exact"] = check_base_weights(ctx, ckpt)

    # 3. the actor side of the LoRA sync: one gather over every LoRA weight, pack on rank 0
    payload = {"buffer": None, "index": None}
    if missing["lora_sync"]:
        detail = f"patched tree lacks {missing['lora_sync']} (ppo_actor.patch / vllm_worker.patch)"
        checks["lora_gather"] = checks["payload_vs_reference"] = {"status": NOT_RUN, "detail": detail}
    else:
        payload = gather_payload(ctx)
        figures["gather_s"], figures["pack_s"] = payload["gather_s"], payload["pack_s"]
        checks["lora_gather"] = check_gather(ctx, payload, ckpt.config["num_hidden_layers"])
        ctx.log(f"LoRA gather {payload['gather_s']:.4f}s, pack {payload['pack_s']:.4f}s")
        if rank == 0:
            buffer, index = payload["buffer"], payload["index"]
            write_atomic(args.out / PAYLOAD_NAME, buffer)
            write_atomic(args.out / PAYLOAD_INDEX_NAME, json.dumps(index, indent=1).encode())
            result["payload"] = {"nbytes": len(buffer), "tensors": len(index["entries"]), "sha256": payload_digest(buffer)}
            if args.reference is None:
                checks["payload_vs_reference"] = {"status": SKIPPED, "detail": "no --reference given"}
            else:
                checks["payload_vs_reference"] = compare_payloads(args.reference, buffer, index)
                if checks["payload_vs_reference"]["status"] == FAILED and max(result["grad_norm"]) >= MAX_NORM:
                    checks["payload_vs_reference"]["detail"] += (
                        "; the gradient was clipped, and the clip factor depends on the order ranks sum the norm in")

    # 4. the patched save_model writes the adapter only; 5. DeepSpeed checkpoint without frozen weights
    save_dir, ds_ckpt_dir = args.out / ADAPTER_DIR, args.out / DS_CKPT_DIR
    if rank == 0:
        for folder in (save_dir, ds_ckpt_dir):
            if folder.exists():
                shutil.rmtree(folder)  # this script's own output of an earlier run
    dist.barrier()
    if missing["save_model"] or missing["lora_sync"]:
        detail = f"patched tree lacks {missing['save_model'] + missing['lora_sync']} (save_model.patch, ppo_actor.patch)"
        checks["save_adapter_only"] = checks["ds_checkpoint_resume"] = {"status": NOT_RUN, "detail": detail}
    else:
        saved = check_save_model(ctx, tokenizer, save_dir, payload, figures, result)
        if saved is not None:
            checks["save_adapter_only"] = saved
        checks["ds_checkpoint_resume"] = check_ds_checkpoint(ctx, ds_ckpt_dir, payload, figures, result)

    return finish(args, rank, world_size, result, checks, figures, device)


def saved_adapter_matches(save_dir: Path, report: dict, buffer_bytes, index) -> tuple[bool, str]:
    """Whether the saved adapter weights equal the gathered LoRA payload bit for bit."""
    import torch

    from rft.openrlhf.vllm_lora_delta import unpack_tensors

    if buffer_bytes is None:
        return True, "adapter not compared with the payload (no payload)"
    if not report["adapter_weight_files"]:
        return False, "no adapter weight file"
    path = save_dir / report["adapter_weight_files"][0]
    if path.suffix == ".bin":
        saved = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        saved = load_file(path)
    payload = unpack_tensors(torch.frombuffer(bytearray(buffer_bytes), dtype=torch.uint8), index["entries"])
    # PEFT saves "<module>.lora_A.weight"; the payload names "<module without base_model.model.>.weight:A"
    by_name = {}
    for key, tensor in payload.items():
        weight, kind = key.rsplit(":", 1)
        by_name[f"base_model.model.{weight.removesuffix('.weight')}.lora_{kind}.weight"] = tensor
    if set(saved) != set(by_name):
        return False, f"saved adapter has {len(saved)} tensors, the payload {len(by_name)}"
    differ = [k for k, v in saved.items() if v.dtype != by_name[k].dtype or not torch.equal(v, by_name[k])]
    if differ:
        return False, f"saved adapter differs from the gathered payload: {differ[:3]}"
    return True, f"saved adapter equals the gathered payload bitwise ({len(saved)} tensors)"


TIMED_STAGES = (("load_s", "load"), ("prepare_s", "prepare"), ("gather_s", "LoRA gather"), ("pack_s", "pack"),
                ("save_s", "save_model"), ("ckpt_save_s", "save_ckpt"), ("ckpt_load_s", "load_ckpt"))


def plot_figures(result: dict, path: Path) -> str:
    """Draw each rank's stage times and peak memory to ``path`` (PNG); returns what happened, in one line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib not installed: {path.name} not written"
    ranks = result["ranks"]
    stages = [(key, label) for key, label in TIMED_STAGES if any(key in r for r in ranks)]
    steps = max((len(r.get("step_s", [])) for r in ranks), default=0)
    labels = [label for _, label in stages] + [f"step {i + 1}" for i in range(steps)]
    fig, (times, memory) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(ranks)
    for i, r in enumerate(ranks):
        values = [r.get(key, 0.0) for key, _ in stages] + list(r.get("step_s", [])) + [0.0] * (steps - len(r.get("step_s", [])))
        times.bar([x + i * width for x in range(len(labels))], values, width, label=f"rank {r['rank']}")
    times.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    times.set_yscale("log")
    times.set_ylabel("seconds")
    times.legend(fontsize=8)
    source = ranks[0].get("peak_memory_source", "")
    memory.bar([f"rank {r['rank']}" for r in ranks], [r.get("peak_memory_bytes", 0) / 2**20 for r in ranks])
    memory.set_ylabel(f"peak MiB ({source})", fontsize=8)
    fig.suptitle(f"ZeRO-3, {result['world_size']} rank(s), {result['backend']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return f"figures drawn in {path}"


def finish(args, rank: int, world_size: int, result: dict, checks: dict, figures: dict, device) -> int:
    """Collect every rank's figures and checks on rank 0, write the JSON, return the exit status."""
    import torch.distributed as dist

    figures["peak_memory_bytes"], figures["peak_memory_source"] = peak_memory(device is not None and device.type == "cuda")
    figures["host_peak_rss_bytes"] = host_peak_rss()  # the MXFP4 load dequantizes in host memory
    mine = {"figures": figures, "checks": checks}
    if dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    status = 0
    if rank == 0:
        merged: dict[str, dict] = {}
        for r, item in enumerate(gathered):  # per check: the first rank's result unless a later one is worse
            for name, check in item["checks"].items():
                if name not in merged or (check["status"] in (FAILED, NOT_RUN) and merged[name]["status"] == PASSED):
                    merged[name] = dict(check, rank=r)
        for name, check in merged.items():
            check["ranks"] = [r for r, item in enumerate(gathered) if name in item["checks"]]
        result["ranks"] = [item["figures"] for item in gathered]
        result["checks"] = merged
        result["exit_status"] = status = exit_status(merged)
        try:  # a plot must never cost the results
            plotted = plot_figures(result, args.out / PLOT_NAME)
        except Exception as err:  # noqa: BLE001
            plotted = f"{PLOT_NAME} not written: {type(err).__name__}: {err}"
        write_atomic(args.out / RESULT_NAME, (json.dumps(result, indent=2) + "\n").encode())
        for name, check in merged.items():
            print(f"[two_rank_zero3] {check['status'].upper():8s} {name}: {check['detail']}", flush=True)
        print(f"[two_rank_zero3] {plotted}", flush=True)
        print(f"[two_rank_zero3] results in {args.out / RESULT_NAME} (exit {status})", flush=True)
    if dist.is_initialized():
        codes = [None] * world_size
        dist.all_gather_object(codes, status)
        status = codes[0]
        dist.barrier()
        dist.destroy_process_group()
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rank, world_size, _ = validate(args)
    except UsageError as err:
        print(f"two_rank_zero3.py: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix=f"two_rank_zero3_r{rank}_"))
    try:
        return run(args, rank, world_size, work)
    except UsageError as err:
        print(f"two_rank_zero3.py: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
