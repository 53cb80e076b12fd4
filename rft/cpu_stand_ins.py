"""What stands in for the GPU when rft's GRPO loop runs on a CPU: every stand-in, in one place.

Used only by the CPU quick start (``train_grpo_tiny.sh``), the end-to-end test that runs it, and
the CPU tests (``tests/conftest.py`` takes :class:`MissingKernel` and :func:`ordered_gathers`
from here); the GPU launchers never load this module. ``rft/cpu_site/sitecustomize.py`` calls
:func:`install` at the start of every Python process of the run (the launcher puts that folder
on ``PYTHONPATH`` of the Ray head and of the job, so the trainer, the Ray actors and vLLM's
worker processes all get it), when ``RFT_CPU_STAND_INS=1``.

Each stand-in replaces one call that cannot run without a CUDA device and changes nothing that
a patch computes: values, names, the order of collective calls and the weight-sync payload
are the real code's. What is not stood in runs for real: OpenRLHF 0.9.3 patched by
``apply_patches.sh``, DeepSpeed ZeRO-3 on its CPU accelerator (which selects the gloo backend
itself), Ray with logical GPU resources (``ray start --num-gpus``), and vLLM 0.15.1's CPU
build, whose platform replaces OpenRLHF's Ray executor by its multiprocessing one.

What the CPU cannot run at all, and stays covered by the GPU lane and the sync tests: NCCL,
CUDA IPC, MXFP4 expert kernels, vLLM's Triton MoE LoRA kernels (the experts stay out of vLLM's
LoRA wrapping here: rft's adapters are on attention only), pinned host memory, and vLLM's Ray
tensor-parallel executor.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable

ENV_FLAG = "RFT_CPU_STAND_INS"
"""Set to ``1`` to install the stand-ins in every process of a run (read by sitecustomize)."""

_HOOKS: dict[str, Callable[[types.ModuleType], None]] = {}


class MissingKernel(types.ModuleType):
    """A compiled CUDA extension that this machine lacks: importing works, calling raises."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a CUDA kernel; there is no GPU here")

        return unavailable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook on a module right after its own code ran, before anyone else sees it."""

    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                real_exec = spec.loader.exec_module

                def exec_module(module, real_exec=real_exec, hook=hook):
                    real_exec(module)
                    hook(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def after_import(name: str):
    """Register ``fn`` to patch module ``name`` once it is imported (at once if it already is)."""

    def register(fn: Callable[[types.ModuleType], None]):
        if name in sys.modules:
            fn(sys.modules[name])
        else:
            _HOOKS[name] = fn
        return fn

    return register


# ---- the stand-ins ----------------------------------------------------------------------


def _flash_attn_kernels() -> None:
    # flash-attn is installed without its CUDA extension: openrlhf.models imports
    # flash_attn.bert_padding (pure torch) and vLLM's rotary embedding imports
    # flash_attn.ops.triton.rotary, both through flash_attn/__init__.py, which imports
    # flash_attn_2_cuda. Nothing on the CPU path calls a kernel.
    sys.modules.setdefault("flash_attn_2_cuda", MissingKernel("flash_attn_2_cuda"))
    # openrlhf/models/utils.py log_probs_from_logits: flash-attn's Triton cross-entropy kernel
    # (CUDA only), with OpenRLHF's own fallback on ImportError: log_softmax as gather minus
    # logsumexp, the same log-probs. None in sys.modules makes that import raise ImportError.
    sys.modules.setdefault("flash_attn.ops.triton.cross_entropy", None)


def _torch_cuda(torch: types.ModuleType) -> None:
    # DeepspeedStrategy.setup_distributed: torch.cuda.set_device(local_rank). No device to pick.
    torch.cuda.set_device = lambda device: None
    # torch_dist_barrier_and_cuda_sync and the trainer's timing points: torch.cuda.synchronize().
    # CPU work is synchronous; there is no stream to wait for.
    torch.cuda.synchronize = lambda device=None: None
    # ppo_actor.py (experience and sync tensors), launcher.py (reference/reward forwards),
    # deepspeed.py all_reduce/all_gather: .to(torch.cuda.current_device()). The tensors stay on
    # the CPU, where DeepSpeed's CPU accelerator keeps the model.
    torch.cuda.current_device = lambda: "cpu"


def _device_mesh(module: types.ModuleType) -> None:
    # DeepspeedStrategy.setup_distributed: init_device_mesh("cuda", (dp, sp, tp)). Same mesh on
    # the CPU device type (gloo).
    real = module.init_device_mesh

    def init_device_mesh(device_type, *args, **kwargs):
        return real("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    module.init_device_mesh = init_device_mesh


def _replay_buffer(module: types.ModuleType) -> None:
    # NaiveReplayBuffer.__init__: torch.device(f"cuda:{torch.cuda.current_device()}"), where
    # experiences go back for training. Build it as on device 0, then hold experiences on the CPU.
    import torch

    cls = module.NaiveReplayBuffer
    real_init = cls.__init__
    cpu_current_device = torch.cuda.current_device

    def __init__(self, *args, **kwargs):
        torch.cuda.current_device = lambda: 0
        try:
            real_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = cpu_current_device
        self.target_device = torch.device("cpu")

    cls.__init__ = __init__


def ordered_gathers(ds_comm: types.ModuleType) -> None:
    # ZeRO-3's coalesced parameter gather launches one async all-gather per parameter and waits
    # on the last handle only: NCCL runs them in order on one stream, gloo may finish them out
    # of order. Waiting on each gives gloo the order DeepSpeed assumes; the values are unchanged.
    def waiting(real):
        def call(*args, **kwargs):
            work = real(*args, **kwargs)
            if kwargs.get("async_op") and work is not None:
                work.wait()
            return work

        return call

    ds_comm.all_gather_into_tensor = waiting(ds_comm.all_gather_into_tensor)
    ds_comm.all_gather = waiting(ds_comm.all_gather)


def moe_left_out_of_lora(module: types.ModuleType) -> None:
    # Replaces vLLM's MoE LoRA wrapper (FusedMoEWithLoRA) with no wrapper at all. With LoRA
    # enabled (the native sync, rft.openrlhf.native_lora) vLLM wraps every FusedMoE in it, and its
    # forward calls a Triton kernel that vLLM's CPU build lacks, so gpt-oss cannot start. rft's
    # adapters target attention q/k/v/o only: the wrapper would hold no adapter weights and add
    # nothing to the experts' output, so leaving the experts unwrapped serves the same function
    # (vLLM's plain CPU MoE path). The manager decides what to wrap by module name
    # (LoRAModelManager._match_target_modules, vllm/lora/model_manager.py:538); the experts are
    # ".experts" modules. An adapter that did name them is refused by native_lora.register_adapter.
    cls = module.LoRAModelManager
    original = cls._match_target_modules
    if getattr(original, "rft_stand_in", False):
        return

    def _match_target_modules(self, module_name: str) -> bool:
        return not module_name.endswith(".experts") and original(self, module_name)

    _match_target_modules.rft_stand_in = True
    cls._match_target_modules = _match_target_modules


def install() -> None:
    """Install every stand-in in this process (idempotent)."""
    if getattr(install, "done", False):
        return
    install.done = True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _flash_attn_kernels()
    sys.meta_path.insert(0, _AfterImport())
    after_import("torch")(_torch_cuda)
    after_import("openrlhf.utils.deepspeed.deepspeed")(_device_mesh)
    after_import("openrlhf.trainer.ppo_utils.replay_buffer")(_replay_buffer)
    after_import("deepspeed.comm")(ordered_gathers)
    after_import("vllm.lora.model_manager")(moe_left_out_of_lora)
