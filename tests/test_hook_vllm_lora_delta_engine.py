"""rft.openrlhf.vllm_lora_delta inside the real vLLM 0.15.1 engine (CPU build) at tensor parallel 2.

No patch is applied. The engine is vLLM's own ``AsyncLLMEngine``, built the way OpenRLHF's
``LLMRayActor`` builds it (the multiprocessing executor stands in for Ray's, which vLLM's CPU
platform does not run), with :class:`LoraDeltaWorker` of this file as ``worker_extension_cls``:
the two methods that ``vllm_worker.patch`` gives OpenRLHF's ``WorkerWrap``, plus one that reads
back what each rank serves. The module's engine hook then drives it through vLLM's real
``collective_rpc`` (msgspec to the engine core, then to each TP worker process) and vLLM's real
gpt-oss loader places the deltas; what the emulation of ``tests/tp_emulation.py`` only imitates.

This file is also the driver, run in a subprocess (vLLM's engine sets process-wide state):

    python tests/test_hook_vllm_lora_delta_engine.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
TP = 2
PROMPT_IDS = [3, 5, 7, 11, 13, 17]
"""Token ids of a fixed prompt whose greedy continuation shows which weights the forward uses."""


class LoraDeltaWorker:
    """What ``vllm_worker.patch`` adds to vLLM's worker, and a read-back of the served weights."""

    def apply_lora_delta(self, spec, blob=None, receive="bytes"):
        from rft.openrlhf import vllm_lora_delta

        return vllm_lora_delta.apply_lora_delta(self, spec, blob, receive)

    def update_weight_from_ray_ref(self, name, dtype, shape, blob):
        from rft.openrlhf import vllm_lora_delta

        return vllm_lora_delta.update_weight_from_ray_ref(self, name, dtype, shape, blob)

    def rft_served_attention(self):
        from e2e_served_weights import read_served

        return read_served(self)


def random_adapter(config: dict, seed: int, magnitude: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{checkpoint name: (A, B)}`` of rank 4 for q/k/v/o of every layer."""
    gen = torch.Generator().manual_seed(seed)
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    rows = {"q": config["num_attention_heads"] * head_dim, "k": config["num_key_value_heads"] * head_dim}
    rows["v"] = rows["k"]
    adapter = {}
    for layer in range(config["num_hidden_layers"]):
        for proj in "qkvo":
            out_dim, in_dim = (hidden, rows["q"]) if proj == "o" else (rows[proj], hidden)
            a = torch.randn(4, in_dim, generator=gen) * magnitude
            b = torch.randn(out_dim, 4, generator=gen) * magnitude
            adapter[f"model.layers.{layer}.self_attn.{proj}_proj.weight"] = (a, b)
    return adapter


async def drive(model_dir: Path) -> dict:
    """Start the engine, sync three adapters through the module's hook, read back after each."""
    import vllm
    from vllm.inputs import TokensPrompt

    import e2e_served_weights as served
    from rft.openrlhf import vllm_lora_delta

    config = json.loads((model_dir / "config.json").read_text())
    scale = 2.0
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(
        model=str(model_dir), tensor_parallel_size=TP, distributed_executor_backend="mp", enforce_eager=True,
        dtype="bfloat16", max_model_len=128, seed=0, worker_extension_cls=f"{Path(__file__).stem}.LoraDeltaWorker",
    ))

    async def greedy() -> dict:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
        request = f"r{len(report['steps'])}"
        async for out in engine.generate(TokensPrompt(prompt_token_ids=PROMPT_IDS), params, request):
            final = out.outputs[0]
        return {"tokens": list(final.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(final.logprobs, final.token_ids)]}

    async def step(label: str, adapter: dict) -> None:
        evidence = None
        if label != "base":
            spec, blob = served.lora_payload(adapter, scale)
            evidence = await vllm_lora_delta.apply_lora_update(engine, spec, blob)
        replies = await engine.collective_rpc("rft_served_attention")
        shards = served.compare_shards(replies, served.expected_shards(model_dir, adapter, scale, TP))
        report["steps"].append({"label": label, "evidence": evidence, "shards": shards, **await greedy()})

    report: dict = {"steps": [], "layers": config["num_hidden_layers"]}
    try:
        await step("base", {})
        await step("first", random_adapter(config, seed=1, magnitude=0.2))
        second = random_adapter(config, seed=2, magnitude=0.2)
        await step("second", second)
        await step("zero", {name: (a, torch.zeros_like(b)) for name, (a, b) in second.items()})
    finally:
        engine.shutdown()
    return report


# ----------------------------------------------------------------------------- the test
@pytest.mark.slow
def test_real_engine_serves_exactly_the_merged_shards(tmp_path):
    pytest.importorskip("vllm")
    from rft.tiny import build_model

    model = tmp_path / "model"
    build_model(model, steps=0, progress=False)  # a tiny gpt-oss (head_dim 64, bf16 experts), untrained
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        # the quick start's stand-ins: flash-attn is installed without its CUDA module (rft/cpu_stand_ins.py)
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "rft" / "cpu_site"), str(TESTS.parent)]),
        "RFT_CPU_STAND_INS": "1",
        # vLLM's CPU build at TP 2 on one NUMA node, a small KV cache, no inductor compile at start
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
        "TORCHDYNAMO_DISABLE": "1",
    }
    proc = subprocess.run([sys.executable, __file__, str(model), str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    steps = {s["label"]: s for s in report["steps"]}
    assert list(steps) == ["base", "first", "second", "zero"]
    for label, s in steps.items():
        assert len(s["shards"]) == TP * 2 * report["layers"] and {r["rank"] for r in s["shards"]} == set(range(TP))
        for row in s["shards"]:  # every rank's qkv_proj and o_proj, bit for bit
            assert row["shape"] == row["expected_shape"] and row["differing"] == 0, (label, row)
    for label in ("first", "second"):
        evidence = steps[label]["evidence"]
        assert evidence["workers"] == TP and evidence["prefix_cache_reset"] == 1.0
        assert 0.5 < evidence["changed_frac"] <= 1 and evidence["delta_norm"] > 0 and evidence["target_norm"] > 0
        assert steps[label]["logprobs"] != steps["base"]["logprobs"]  # the forward uses the merged weights
    # a zero adapter after two syncs: W0 bit for bit (above), so the base model's very generation
    assert steps["zero"]["evidence"]["delta_norm"] == 0.0 and steps["zero"]["evidence"]["changed_frac"] == 0.0
    assert (steps["zero"]["tokens"], steps["zero"]["logprobs"]) == (steps["base"]["tokens"], steps["base"]["logprobs"])


if __name__ == "__main__":
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # as OpenRLHF's LLMRayActor sets it
    Path(sys.argv[2]).write_text(json.dumps(asyncio.run(drive(Path(sys.argv[1]))), indent=1))
