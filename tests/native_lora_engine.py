"""Drive rft.openrlhf.native_lora inside the real vLLM 0.15.1 engine (CPU build); write a JSON report.

    python tests/native_lora_engine.py MODEL_DIR ADAPTERS.pt TP OUT.json

Run by ``tests/test_native_lora_engine.py`` in a subprocess (vLLM's engine sets process-wide
state). It starts vLLM's own ``AsyncLLMEngine`` with LoRA enabled (``engine_lora_kwargs``) and
:class:`NativeLoraWorker` as ``worker_extension_cls``: the methods a patched ``WorkerWrap`` gets,
plus a read-back of the adapter slots vLLM filled on each rank. For every adapter of
``ADAPTERS.pt`` (``{label: {"scale": s, "adapter": {checkpoint name: (A, B)}}}``, in order) it
loads it through the module's engine half, then records the prompt log-probs of fixed prompts
and a greedy continuation under the request the module names. Then it removes the adapter and
records the base again (at TP 1, first an adapter on a module vLLM does not wrap must be refused
with the current adapter kept), and last it sends an adapter holding NaN (a worker that raised leaves
stale replies queued on the multiprocessing executor, so nothing runs after it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path

import torch

PROMPT_COUNT, PROMPT_TOKENS = 4, 96
PROMPTS = [random.Random(seed).choices(range(3, 100), k=PROMPT_TOKENS) for seed in range(PROMPT_COUNT)]
"""Token ids of the fixed prompts (the tiny vocabulary has 104 tokens): 380 teacher-forced log-probs."""
GREEDY_TOKENS = 8


MOE_UNWRAPPED_ENV = "RFT_TEST_MOE_LORA_UNWRAPPED"
"""Set to 1 for gpt-oss on the CPU build: its MoE layer is left out of vLLM's LoRA wrapping."""


def leave_moe_unwrapped() -> None:
    """The CPU run's stand-in for vLLM's MoE LoRA wrapper (``rft.cpu_stand_ins.moe_left_out_of_lora``:
    the experts are left unwrapped, which changes nothing for an adapter on attention only).
    Imported into every worker process with this module (the ``worker_extension_cls``), before
    the model is loaded and wrapped."""
    from vllm.lora import model_manager

    from rft.cpu_stand_ins import moe_left_out_of_lora

    moe_left_out_of_lora(model_manager)


if os.environ.get(MOE_UNWRAPPED_ENV) == "1":
    leave_moe_unwrapped()


class NativeLoraWorker:
    """What a patched ``WorkerWrap`` adds for native LoRA, and a read-back of the filled slots."""

    def load_lora_native(self, spec, blob, lora_id, keep=(), receive="bytes"):
        from rft.openrlhf import native_lora

        return native_lora.load_native_lora(self, spec, blob, lora_id, keep, receive)

    def remove_lora_native(self, lora_id):
        from rft.openrlhf import native_lora

        return native_lora.remove_native_lora(self, lora_id)

    def rft_lora_slots(self, lora_id, layer=0):
        """This rank's slot of adapter ``lora_id`` in layer ``layer``'s qkv_proj and o_proj, as lists."""
        from vllm.distributed import get_tensor_model_parallel_rank

        manager = self.model_runner.lora_manager._adapter_manager
        slot = manager.lora_index_to_id.index(lora_id)
        out = {"rank": get_tensor_model_parallel_rank(), "held": sorted(manager.list_adapters())}
        for proj in ("qkv_proj", "o_proj"):  # Llama: .self_attn.qkv_proj; gpt-oss: .attn.qkv_proj
            (module,) = [m for name, m in manager.modules.items()
                         if name.startswith(f"model.layers.{layer}.") and name.endswith(f".{proj}")]
            out[proj] = {
                "a": [t[slot, 0].float().tolist() for t in module.lora_a_stacked],
                "b": [t[slot, 0].float().tolist() for t in module.lora_b_stacked],
            }
        return out

    def rft_held_loras(self):
        return sorted(self.model_runner.lora_manager.list_adapters())


async def drive(model_dir: Path, adapters: dict, tp: int) -> dict:
    import vllm
    from vllm.inputs import TokensPrompt

    import e2e_served_weights as served
    from rft.openrlhf import native_lora

    rank = max(a.shape[0] for entry in adapters.values() for a, _ in entry["adapter"].values())
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(
        model=str(model_dir), tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None,
        enforce_eager=True, dtype="bfloat16", max_model_len=128, seed=0,
        worker_extension_cls=f"{Path(__file__).stem}.NativeLoraWorker", **native_lora.engine_lora_kwargs(rank),
    ))
    state = native_lora.NativeLoraEngine()
    report: dict = {"tp": tp, "steps": []}
    counter = iter(range(10**6))

    async def one(prompt: list[int], lora_request) -> dict:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, prompt_logprobs=0, logprobs=0)
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"r{next(counter)}",
                                         lora_request=lora_request):
            final = out
        prompt_lp = [step[token].logprob for step, token in zip(final.prompt_logprobs[1:], prompt[1:])]
        sample = final.outputs[0]
        sampled_lp = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
        return {"prompt_logprobs": prompt_lp, "tokens": list(sample.token_ids), "token_logprobs": sampled_lp}

    async def record(label: str, lora_request, evidence=None) -> None:
        rows = [await one(prompt, lora_request) for prompt in PROMPTS]
        step = {"label": label, "evidence": evidence, "rows": rows,
                "lora_name": getattr(lora_request, "lora_name", None)}
        if lora_request is not None:
            step["slots"] = await engine.collective_rpc("rft_lora_slots", args=(lora_request.lora_int_id,))
        step["held"] = await engine.collective_rpc("rft_held_loras")
        report["steps"].append(step)

    try:
        await record("base", None)
        for label, entry in adapters.items():
            spec, blob = served.lora_payload(entry["adapter"], entry["scale"])
            evidence = await state.update(engine, spec, blob)
            await record(label, state.request, evidence)
        if tp == 1:  # a refusal leaves stale replies queued on the multiprocessing executor (TP > 1)
            stray = {"model.layers.0.self_attn.rotary_emb.weight": (torch.ones(4, 256), torch.ones(256, 4))}
            spec, blob = served.lora_payload(stray, 2.0)
            try:
                await state.update(engine, spec, blob)
                report["unserved"] = {"refused": False}
            except Exception as exc:  # noqa: BLE001 - the refusal is what is recorded
                report["unserved"] = {"refused": True, "error": str(exc)[-2000:], "version_after": state.version,
                                      "held": await engine.collective_rpc("rft_held_loras")}
        removed = await engine.collective_rpc("remove_lora_native", args=(state.version,))
        report["removed"] = removed
        await record("removed", None)
        nan = {name: (a, b.clone()) for name, (a, b) in next(iter(adapters.values()))["adapter"].items()}
        next(iter(nan.values()))[1][0, 0] = float("nan")
        spec, blob = served.lora_payload(nan, 2.0)
        try:
            await state.update(engine, spec, blob)
            report["nan"] = {"refused": False}
        except Exception as exc:  # noqa: BLE001 - the refusal is what is recorded
            report["nan"] = {"refused": True, "error": str(exc)[-2000:], "version_after": state.version}
    finally:
        engine.shutdown()
    return report


if __name__ == "__main__":
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # as OpenRLHF's LLMRayActor sets it
    model, adapters_file, tp, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    adapters = torch.load(adapters_file)
    out.write_text(json.dumps(asyncio.run(drive(model, adapters, tp)), indent=1))
