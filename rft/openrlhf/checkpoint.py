"""LoRA saves that hold the adapter only, and DeepSpeed checkpoints without the frozen base model.

OpenRLHF 0.9.3's ``DeepspeedStrategy`` (``utils/deepspeed/deepspeed.py``) handles a LoRA model as a
full one in three places; ``save_model.patch`` calls this module there:

* ``save_model`` (``:349-399``) gathers the whole ZeRO-3 model to rank 0 (``:358-362``) only to
  keep the adapter out of it. :func:`adapter_only` decides when the trainable parameters alone
  suffice, and :func:`gather_trainable` gathers just those. PEFT saves frozen weights too when
  the adapter targets embedding layers, and DeepSpeed tensor parallelism shards differently:
  both keep 0.9.3's full gather.
* Full-model weight files beside an adapter are left over from an earlier save into a reused
  directory (in 0.9.3 only the non-LoRA branch, ``:397``, writes them). After a LoRA save,
  :func:`remove_full_model_files` deletes them on rank 0 before the barrier, logging names and
  bytes; a directory that held a full model and no adapter before the save
  (:func:`holds_full_model_only`) is a legitimate full save and is never touched.
* ``save_ckpt`` (``:492``) writes each rank's fragment of every frozen weight, i.e. the whole base
  model per checkpoint. The patch passes ``exclude_frozen_parameters`` for a LoRA model, and
  ``load_ckpt`` (``:510``) loads such checkpoints (and older complete ones) through
  :func:`load_without_frozen`: frozen weights come from the pretrained model, which never
  changes them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FULL_MODEL_FILES = (
    "pytorch_model*.bin",
    "model*.safetensors",
    "pytorch_model.bin.index.json",
    "model.safetensors.index.json",
)
"""What transformers' save_pretrained writes for a full model: single files, shards, shard indexes."""

ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's marker of an adapter directory."""

EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings")
"""Module names for which PEFT's save also writes the frozen base weights (its embedding layers)."""

GATHER_GROUP = 64
"""Parameters gathered per ZeRO-3 all-gather: few collectives, bounded memory."""


def full_model_files(output_dir: str) -> dict[str, int]:
    """Full-model weight files in ``output_dir``: name -> size in bytes."""
    found = {}
    for pattern in FULL_MODEL_FILES:
        for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
            found[os.path.basename(path)] = os.path.getsize(path)
    return found


def holds_full_model_only(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a full model and no adapter: a legitimate full save, kept.

    Asked before a save writes anything."""
    return bool(full_model_files(output_dir)) and not os.path.exists(os.path.join(output_dir, ADAPTER_CONFIG))


def remove_full_model_files(output_dir: str, held_full_model: bool, log: Callable[[str], Any]) -> None:
    """After a LoRA save: delete full-model weight files beside the adapter, logging names and bytes.

    ``held_full_model`` is :func:`holds_full_model_only` from before the save: such files are
    kept and only reported. Without an adapter config in the directory nothing is done."""
    if not os.path.exists(os.path.join(output_dir, ADAPTER_CONFIG)):
        return
    found = full_model_files(output_dir)
    if held_full_model:
        log(f"save_model: {output_dir} also holds a full model saved earlier "
            f"({len(found)} files, {sum(found.values())} bytes); kept")
        return
    for name in sorted(found):
        os.remove(os.path.join(output_dir, name))
    if found:
        log(f"save_model: removed {len(found)} full-model files ({sum(found.values())} bytes) beside the LoRA "
            f"adapter in {output_dir}: {', '.join(sorted(found))}")


def adapter_only(model: nn.Module, tensor_parallel_size: int) -> bool:
    """Whether a save of ``model`` needs its trainable parameters only: a PEFT model, no DeepSpeed
    tensor parallelism, no adapter on an embedding layer."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or tensor_parallel_size > 1:
        return False
    targets = getattr(model.peft_config.get(model.active_adapter), "target_modules", None) or ()
    return not any(name in targets for name in EMBEDDING_MODULES)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train (the adapter's, for a LoRA model)."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def gather_trainable(model: nn.Module, is_rank_0: bool, group_size: int = GATHER_GROUP) -> dict[str, torch.Tensor]:
    """Trainable parameters, gathered whole and copied to the CPU on rank 0 (empty elsewhere).

    A collective under ZeRO-3: every rank must call it, with the same model."""
    import deepspeed

    state_dict = {}
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    for start in range(0, len(trainable), group_size):
        group = trainable[start : start + group_size]
        partitioned = [param for _, param in group if hasattr(param, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
            if is_rank_0:
                for name, param in group:
                    state_dict[name] = param.detach().to("cpu", copy=True)
    return state_dict


def load_without_frozen(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a module state saved without frozen weights; any other missing or extra key is an error.

    DeepSpeed's ``custom_load_fn``: called with the checkpoint's module state and the module."""
    missing, unexpected = dst.load_state_dict(src, strict=False)
    frozen = {name for name, param in dst.named_parameters() if not param.requires_grad}
    wrong = sorted(set(missing) - frozen) + sorted(unexpected)
    if wrong:
        raise RuntimeError(f"checkpoint does not match the model: {len(wrong)} keys, e.g. {wrong[:3]}")
