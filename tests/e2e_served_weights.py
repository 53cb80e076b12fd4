"""Serve a saved LoRA adapter through the real vLLM 0.15.1 engine at TP 2 and read back every shard.

    python tests/e2e_served_weights.py MODEL_DIR ADAPTER_DIR OUT.json

Run by ``tests/test_e2e_tiny.py`` with the environment of ``train_grpo_tiny.sh`` (the patched
OpenRLHF copy and ``rft/cpu_site`` on ``PYTHONPATH``, ``RFT_CPU_STAND_INS=1``). It starts a vLLM
engine (CPU build, tensor parallel 2, multiprocessing executor) with the patched
``WorkerWrap`` as ``worker_extension_cls``, exactly as OpenRLHF configures its engines, sends
the adapter through the patched worker's ``apply_lora_delta`` (the sync's own payload format,
merged by ``rft.openrlhf.vllm_lora_delta``), then reads every attention weight each TP rank
serves through ``collective_rpc`` and compares it, byte for byte, with ``bf16(W0 + scale * B @ A)`` computed here from the checkpoint's
safetensors and the adapter's files, sliced the way vLLM's loaders shard gpt-oss (q/k/v rows
by head, stacked into ``qkv_proj``; ``o_proj`` columns).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{checkpoint weight name: (A, B)}`` and the scale alpha / r, from PEFT's saved files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora"):
        raise SystemExit("rsLoRA adapters are not expected here")
    scale = float(config["lora_alpha"]) / float(config["r"])
    files = sorted(adapter_dir.glob("adapter_model.*"))
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(files[0]))
    else:
        state = torch.load(files[0], map_location="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".lora_")
        pairs.setdefault(module.removeprefix("base_model.model.") + ".weight", {})[rest[0]] = value
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}, scale


def expected_shards(model_dir: Path, adapter, scale: float, tp: int) -> dict[tuple[int, str], torch.Tensor]:
    """``{(rank, served name): bf16 tensor}`` for every attention weight, computed independently."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    base = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        base.update(load_file(str(f)))

    def served_full(name: str) -> torch.Tensor:
        w0 = base[name]
        if name not in adapter:
            return w0
        a, b = adapter[name]
        return (w0.float() + scale * (b.float() @ a.float())).to(torch.bfloat16)

    q_rows = config["num_attention_heads"] * config["head_dim"] // tp
    kv_rows = config["num_key_value_heads"] * config["head_dim"] // tp
    out = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn"
        q, k, v, o = (served_full(f"{prefix}.{p}_proj.weight") for p in "qkvo")
        for rank in range(tp):
            out[(rank, f"model.layers.{layer}.attn.qkv_proj.weight")] = torch.cat(
                [q[rank * q_rows : (rank + 1) * q_rows], k[rank * kv_rows : (rank + 1) * kv_rows],
                 v[rank * kv_rows : (rank + 1) * kv_rows]]
            )
            cols = o.shape[1] // tp
            out[(rank, f"model.layers.{layer}.attn.o_proj.weight")] = o[:, rank * cols : (rank + 1) * cols]
    return out


def read_served(worker) -> dict:
    """Runs inside each vLLM worker: its TP rank and the bytes of every attention weight it serves."""
    from vllm.distributed import get_tensor_model_parallel_rank

    weights = {}
    for name, param in worker.model_runner.model.named_parameters():
        if name.endswith(("qkv_proj.weight", "o_proj.weight")):
            data = param.data.detach().to("cpu").contiguous()
            weights[name] = [str(data.dtype), list(data.shape), data.view(torch.uint8).reshape(-1).numpy().tobytes()]
    return {"rank": get_tensor_model_parallel_rank(), "weights": weights}


def compare_shards(served: list[dict], expected: dict[tuple[int, str], torch.Tensor]) -> list[dict]:
    """One row per served shard (the replies of :func:`read_served`): its shape and how many of its
    bf16 entries differ, bit for bit, from the expected shard (-1 when the shapes differ)."""
    rows = []
    for reply in served:
        rank = reply["rank"]
        for name, (dtype, shape, raw) in sorted(reply["weights"].items()):
            got = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype.removeprefix("torch.")))
            want = expected[(rank, name)]
            same_shape = list(want.shape) == shape
            differ = int((got.reshape(shape).view(torch.int16) != want.view(torch.int16)).sum()) if same_shape else -1
            rows.append({"rank": rank, "name": name, "shape": shape, "expected_shape": list(want.shape),
                         "entries": want.numel(), "differing": differ})
    return rows


def lora_payload(adapter, scale: float) -> tuple[dict, bytes]:
    """The sync's spec and bytes for ``adapter``, packed with the trainer's own codec."""
    from rft.openrlhf.lora_sync import LORA_PAYLOAD_FORMAT, pack_tensors

    named = [(f"{name}:{kind}", tensor) for name, (a, b) in adapter.items() for kind, tensor in (("A", a), ("B", b))]
    buffer, entries = pack_tensors(named)
    spec = {"format": LORA_PAYLOAD_FORMAT, "nbytes": buffer.numel(), "entries": entries,
            "targets": [[name, scale] for name in adapter]}
    return spec, buffer.numpy().tobytes()


def main(model_dir: Path, adapter_dir: Path, out_path: Path) -> int:
    import vllm

    tp = 2
    adapter, scale = read_adapter(adapter_dir)
    spec, blob = lora_payload(adapter, scale)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # as OpenRLHF's LLMRayActor sets it
    llm = vllm.LLM(
        model=str(model_dir), tensor_parallel_size=tp, distributed_executor_backend="mp", enforce_eager=True,
        dtype="bfloat16", max_model_len=256, seed=0,
        worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap",
    )
    evidence = llm.collective_rpc("apply_lora_delta", args=(spec, blob))
    shards = compare_shards(llm.collective_rpc(read_served), expected_shards(model_dir, adapter, scale, tp))
    report = {"tp": tp, "scale": scale, "adapted": sorted(adapter), "evidence": evidence, "shards": shards}
    out_path.write_text(json.dumps(report, indent=1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Exit code 0 when the report was written.")
    parser.add_argument("model_dir", type=Path, help="the base checkpoint the engine serves (safetensors, config.json)")
    parser.add_argument("adapter_dir", type=Path, help="a saved PEFT LoRA adapter of that model (adapter_config.json)")
    parser.add_argument("out", type=Path, help="where to write the JSON report: the evidence and one row per shard")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    raise SystemExit(main(args.model_dir, args.adapter_dir, args.out))
