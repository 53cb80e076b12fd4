"""How OpenRLHF 0.9.3's ``Actor`` loads a checkpoint: gpt-oss in MXFP4, trained in bf16 under ZeRO-3.

gpt-oss ships its MoE experts in MXFP4, which cannot be trained, and 0.9.3 cannot load such a
checkpoint at all: ``models/actor.py:92-99`` passes ``quantization_config=None``, which replaces
the checkpoint's own, and transformers 4.57.6 then fails formatting the config
(``AttributeError: 'NoneType' object has no attribute 'to_dict'``). ``actor.patch`` makes the
``Actor`` build a :class:`CheckpointLoader` from the checkpoint's ``config.json`` before any weight
is read, and load through it:

* gpt-oss has attention sinks; settings that drop them in training are refused in one line
  (:func:`check_gpt_oss_settings`);
* an MXFP4 checkpoint (``quantization_config.quant_method == "mxfp4"``) loads with
  ``Mxfp4Config(dequantize=True)`` in bf16. Under ZeRO-3 it loads on the CPU, because
  transformers refuses ``device_map`` while a ZeRO-3 ``HfDeepSpeedConfig`` is alive (0.9.3 makes
  one before loading, ``models/actor.py:64-65``; the loader makes it after), and is then
  partitioned one tensor at a time (:func:`partition_for_zero3`): DeepSpeed 0.18.5 would
  otherwise move the whole dequantized model onto one GPU in ``deepspeed.initialize``. Each rank
  holds the full bf16 model in host memory while loading (about 42 GB for gpt-oss-20b, 234 GB
  for gpt-oss-120b);
* with ``RFT_FAST_GPTOSS`` set in the actor's process (off by default), a gpt-oss model gets
  ``rft.fast_gptoss``'s routed experts and sink-aware flex attention right after loading,
  before LoRA wraps it.

Every other checkpoint takes 0.9.3's ``from_pretrained`` call unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from rft.contract import ENV_FAST_GPTOSS

GPT_OSS_ATTN_IMPLEMENTATIONS = ("eager", "flex_attention")
"""Attention implementations of transformers 4.57.6 that apply gpt-oss's attention sinks in
training: eager adds the sink logit to the softmax, flex_attention renormalises with it (on GPU).
flash_attention_2 drops the sinks without a word, and sdpa is refused by the model."""


def read_checkpoint_config(pretrain: str) -> dict:
    """The config.json of a local checkpoint or hub id, read without loading any weight.

    Returns an empty dict when it cannot be read: from_pretrained then reports the problem in
    its own words."""
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrain)
    except (OSError, ValueError):
        return {}
    return config_dict


def is_mxfp4_checkpoint(config_dict: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config declares MXFP4 weights (``quantization_config.quant_method``)."""
    quantization_config = config_dict.get("quantization_config")
    if not isinstance(quantization_config, Mapping):
        return False
    return str(quantization_config.get("quant_method", "")).lower() == "mxfp4"


def check_gpt_oss_settings(pretrain: str, attn_implementation: str | None, packing_samples: bool) -> None:
    """Refuse settings that would train gpt-oss without its attention sinks."""
    if attn_implementation not in GPT_OSS_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"{pretrain}: gpt-oss has attention sinks, which attn_implementation={attn_implementation!r} "
            f"does not apply in training; pass --attn_implementation eager"
        )
    if packing_samples:
        raise ValueError(
            f"{pretrain}: --packing_samples needs flash_attention_2, which drops gpt-oss's attention sinks; "
            f"remove --packing_samples"
        )


def check_mxfp4_settings(pretrain: str, param_dtype: str, load_in_4bit: bool) -> None:
    """Refuse settings that cannot be combined with dequantizing an MXFP4 checkpoint to bf16."""
    if load_in_4bit:
        raise ValueError(
            f"{pretrain} is an MXFP4 checkpoint, dequantized to bf16 for training; "
            f"it cannot also be loaded in 4 bit: remove --load_in_4bit"
        )
    if param_dtype != "bf16":
        raise ValueError(
            f"{pretrain} is an MXFP4 checkpoint, dequantized to bf16 for training; "
            f"pass --param_dtype bf16 (got {param_dtype!r})"
        )


def is_zero3(ds_config: Mapping[str, Any] | None) -> bool:
    """Whether a DeepSpeed config partitions parameters (ZeRO stage 3), as 0.9.3's Actor tests it."""
    return ds_config is not None and ds_config["zero_optimization"]["stage"] == 3


def fast_gptoss_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the process asks for rft's faster gpt-oss paths (anything but unset, empty or 0)."""
    return environ.get(ENV_FAST_GPTOSS, "0") not in ("", "0")


@contextlib.contextmanager
def hf_zero3_suspended() -> Iterator[None]:
    """Hide a live ZeRO-3 HfDeepSpeedConfig from transformers for the duration of the block.

    transformers 4.57.6 refuses ``device_map`` while any ZeRO-3 HfDeepSpeedConfig is alive (it
    keeps a weak reference to the newest one). The config is restored afterwards, so a holder
    elsewhere in the process (another model of the same actor) keeps working."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    if live is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live)


def partition_for_zero3(model: nn.Module, ds_config: Mapping[str, Any]) -> None:
    """Turn a model loaded on the CPU into ZeRO-3 partitioned parameters, one tensor at a time.

    DeepSpeed would otherwise move the whole model to the GPU in deepspeed.initialize. Each
    parameter is copied to the GPU, broadcast from rank 0, partitioned and freed; partitions
    live on the CPU when the config offloads parameters. Buffers go to the GPU, as zero.Init
    would have created them there."""
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    device = torch.device(deepspeed.get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def load_mxfp4_dequantized(model_class: Any, pretrain: str, zero3: bool, **from_pretrained_kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained`` of an MXFP4 checkpoint with its experts dequantized.

    The keyword arguments are 0.9.3's (``models/actor.py:92-99``); the quantization config becomes
    ``Mxfp4Config(dequantize=True)``. Under ZeRO-3 the model loads on the CPU unless a device map
    is given: each expert tensor is decoded on its own (on the GPU when there is one) and lands
    in host memory."""
    from transformers import Mxfp4Config

    kwargs = dict(from_pretrained_kwargs, quantization_config=Mxfp4Config(dequantize=True))
    if zero3 and kwargs.get("device_map") is None:
        kwargs["device_map"] = "cpu"
    with hf_zero3_suspended() if zero3 else contextlib.nullcontext():
        return model_class.from_pretrained(pretrain, **kwargs)


class CheckpointLoader:
    """How the Actor loads one checkpoint, decided from its config.json before any weight is read.

    Building it refuses the settings a gpt-oss or MXFP4 checkpoint cannot train with.
    :meth:`from_pretrained` takes 0.9.3's call unchanged and returns the model to wrap with LoRA.
    For an MXFP4 checkpoint under ZeRO-3 the Actor must not make its HfDeepSpeedConfig before
    loading (:attr:`mxfp4`): the loader makes it afterwards and holds it, so it lives exactly as
    long as 0.9.3's ``dschf``, the Actor's ``__init__``.
    """

    def __init__(
        self,
        pretrain: str,
        attn_implementation: str | None,
        packing_samples: bool,
        param_dtype: str,
        load_in_4bit: bool,
        ds_config: Mapping[str, Any] | None,
    ) -> None:
        config = read_checkpoint_config(pretrain)
        self.gpt_oss = config.get("model_type") == "gpt_oss"
        if self.gpt_oss:
            check_gpt_oss_settings(pretrain, attn_implementation, packing_samples)
        self.mxfp4 = is_mxfp4_checkpoint(config)
        if self.mxfp4:
            check_mxfp4_settings(pretrain, param_dtype, load_in_4bit)
        self.ds_config = ds_config
        self.hf_ds_config: Any = None

    def from_pretrained(self, model_class: Any, pretrain: str, **kwargs: Any) -> nn.Module:
        """Load ``pretrain`` as 0.9.3 would, except for what the checkpoint needs (see the class)."""
        zero3 = is_zero3(self.ds_config)
        if not self.mxfp4:
            model = model_class.from_pretrained(pretrain, **kwargs)
        else:
            model = load_mxfp4_dequantized(model_class, pretrain, zero3, **kwargs)
            if zero3:
                from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

                if not is_deepspeed_zero3_enabled():  # else a config held elsewhere is back in place
                    self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)
                partition_for_zero3(model, self.ds_config)
        if self.gpt_oss and fast_gptoss_requested():
            from rft.fast_gptoss import SETTING, describe_install, install_from_env

            counts = install_from_env(model)
            # which parts took: resident, say, is off under offload or when the weights do not fit
            print(describe_install(counts, os.environ.get(SETTING)), flush=True)
        return model
