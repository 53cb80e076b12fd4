"""Build a tiny gpt-oss checkpoint on disk, with its experts in MXFP4, without the hub.

The checkpoint has the layout of ``openai/gpt-oss-20b`` at toy size: a
``GptOssConfig`` with 2 layers, hidden size 64, 4 experts (top-2), random
weights, and the expert matrices stored as MXFP4 the way transformers 4.57.6
reads them (``integrations/mxfp4.py``, ``convert_moe_packed_tensors``):

* ``model.layers.N.mlp.experts.gate_up_proj_blocks``  uint8 ``[E, 2I, H/32, 16]``
* ``model.layers.N.mlp.experts.gate_up_proj_scales``  uint8 ``[E, 2I, H/32]``
* ``model.layers.N.mlp.experts.down_proj_blocks``     uint8 ``[E, H, I/32, 16]``
* ``model.layers.N.mlp.experts.down_proj_scales``     uint8 ``[E, H, I/32]``

MXFP4 (OCP microscaling): every run of 32 consecutive values along the input
dimension shares one power-of-two scale, stored as the biased exponent
``e + 127``; each value is an FP4 E2M1 code (sign bit plus index into
``0, 0.5, 1, 1.5, 2, 3, 4, 6``), two codes per byte, the even element in the
low nibble. The value is ``FP4[code] * 2**e``. The model's own tensors are
``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``: the blocks hold their
transposes, which is why transformers transposes after decoding.

Everything else (attention, router, embeddings, norms, sinks, expert biases) is
stored in bf16, and ``config.json`` carries ``quantization_config`` with
``quant_method: mxfp4`` as the released checkpoints do. A small word-level
tokenizer is written beside it so that tokenizer-loading code paths work.

Use it from tests (``build_tiny_gptoss(tmp_path / "ckpt")``) or from the shell::

    python tests/tiny_gptoss.py /tmp/tiny-gptoss          # MXFP4 experts
    python tests/tiny_gptoss.py /tmp/tiny-bf16 --bf16     # same model, all bf16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rft.tiny import YARN_ROPE_SCALING

FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The non-negative E2M1 values, indexed by the low three bits of a code."""

MXFP4_GROUP = 32
"""Values that share one scale."""

MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
"""As in the released gpt-oss ``quantization_config``: only the experts are MXFP4."""

TINY_CONFIG = dict(
    num_hidden_layers=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=16,
    max_position_embeddings=512,
    rope_scaling=dict(YARN_ROPE_SCALING),  # gpt-oss's YaRN, scaled to 512 positions
    tie_word_embeddings=False,
)
"""Sizes of the tiny model; hidden and intermediate sizes are multiples of 32 (the MXFP4 group)."""


@dataclass
class TinyCheckpoint:
    """What :func:`build_tiny_gptoss` wrote, and the weights it was made from."""

    path: Path
    mxfp4: bool
    config: dict
    source: dict[str, torch.Tensor] = field(repr=False)
    """Every parameter in the model's own layout, float32, before any rounding."""
    stored: dict[str, torch.Tensor] = field(repr=False)
    """Every tensor exactly as written to ``model.safetensors``."""


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., K]`` to MXFP4 along its last axis (round to nearest).

    Returns ``blocks`` (uint8 ``[..., K/32, 16]``) and ``scales`` (uint8
    ``[..., K/32]``, biased exponents). The scale exponent of a group is the
    smallest ``e`` with ``max|w| / 2**e <= 6``, so no value saturates.
    """
    if w.shape[-1] % MXFP4_GROUP:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {MXFP4_GROUP}")
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    x = groups / torch.exp2(exp).unsqueeze(-1)
    grid = torch.tensor(FP4_MAGNITUDES, device=w.device)
    # nearest grid value; a tie goes to the smaller magnitude
    magnitude_code = torch.bucketize(x.abs(), (grid[1:] + grid[:-1]) / 2)
    codes = magnitude_code + 8 * (x < 0).long()
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.to(torch.uint8), (exp + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode MXFP4 ``blocks``/``scales`` to float32 ``[..., K]`` (the inverse layout of :func:`quantize_mxfp4`)."""
    grid = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES))
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]
    values = grid[codes].reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])  # [..., G, 32]
    values = values * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], -1)


def mxfp4_error_bound(w: torch.Tensor) -> torch.Tensor:
    """Largest round-to-nearest error MXFP4 allows for each element of ``w [..., K]``.

    Half the gap between the two E2M1 values around ``|w| / 2**e``, times ``2**e``:
    gaps are 0.5 below 2, 1 from 2 to 4 and 2 from 4 to 6.
    """
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    scale = torch.exp2(exp)
    x = groups.abs() / scale
    half_gap = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0))
    return (half_gap * scale).reshape(w.shape)


def _random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 values for every parameter: N(0, 0.02), norms around 1, non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=gen) * 0.02
        if "norm" in name:
            values = 1.0 + values
        weights[name] = values
    return weights


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_tokenizer(dest: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``t0 .. tN`` with ``<|endoftext|>`` as pad and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    vocab.update({f"t{i}": i for i in range(2, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok.save_pretrained(str(dest))


def build_tiny_gptoss(
    dest: Path | str, *, mxfp4: bool = True, seed: int = 0, quantize_device: str = "cpu", **overrides
) -> TinyCheckpoint:
    """Write a tiny random gpt-oss checkpoint to ``dest``; experts in MXFP4 unless ``mxfp4=False``.

    ``overrides`` change :data:`TINY_CONFIG` entries (full-width layers for benchmarks,
    say); ``quantize_device="cuda"`` quantizes large experts faster. Files are written
    under a temporary name and renamed, so an interrupted build leaves no half-written file.
    """
    from safetensors.torch import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = GptOssConfig(**{**TINY_CONFIG, **overrides})
    with torch.device("meta"):
        skeleton = GptOssForCausalLM(config)
    source = _random_weights(skeleton, seed)

    stored: dict[str, torch.Tensor] = {}
    for name, value in source.items():
        if mxfp4 and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # The checkpoint holds the transpose: [E, out, in], grouped along `in`.
            blocks, scales = zip(*(quantize_mxfp4(expert.T.contiguous().to(quantize_device)) for expert in value))
            stored[f"{name}_blocks"] = torch.stack(blocks).cpu()
            stored[f"{name}_scales"] = torch.stack(scales).cpu()
        else:
            stored[name] = value.to(torch.bfloat16)

    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "bfloat16"
    if mxfp4:
        config_dict["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT),
        }

    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".model.safetensors.")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in stored.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, dest / "model.safetensors")
    _atomic_write_text(dest / "config.json", json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(dest, config.vocab_size)
    return TinyCheckpoint(path=dest, mxfp4=mxfp4, config=config_dict, source=source, stored=stored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="directory to write the checkpoint to")
    parser.add_argument("--bf16", action="store_true", help="store the experts in bf16 instead of MXFP4")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    ckpt = build_tiny_gptoss(args.dest, mxfp4=not args.bf16, seed=args.seed)
    n_params = sum(v.numel() for v in ckpt.source.values())
    kind = "MXFP4 experts" if ckpt.mxfp4 else "bf16"
    print(f"wrote {ckpt.path} ({kind}, {n_params} parameters, {len(ckpt.stored)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
