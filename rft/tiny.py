"""A tiny gpt-oss, its tokenizer and a toy task: the quick start's whole world, built on a CPU.

``train_grpo_tiny.sh`` trains this model with the launchers' own GRPO command, scaled down, so
that a new user (and the end-to-end test) sees the whole loop run before renting a node.

The model
    A ``GptOssForCausalLM`` of the released checkpoints' shape at toy size: 2 layers (one
    sliding-window, one full attention), 4 experts (top-2) stored in **bf16** (vLLM's MXFP4 MoE
    kernels need a GPU; the attention weights, which rft's LoRA trains and syncs, load through
    the same vLLM code either way), learned attention sinks, YaRN RoPE, and head_dim 64 (the
    smallest head size vLLM's CPU attention kernel takes).

The tokenizer
    Character level (one token per printable ASCII character) plus gpt-oss's Harmony special
    tokens (``<|start|>``, ``<|message|>``, ``<|channel|>``, ``<|end|>``, ``<|return|>``,
    ``<|call|>``, ``<|endoftext|>`` ...). Its chat template writes prompts of gpt-oss's shape
    (a system message with the reasoning effort, then ``<|start|>user<|message|>...<|end|>
    <|start|>assistant``), and ``generation_config.json`` lists the Harmony stop tokens
    (``<|return|>``, ``<|call|>``, ``<|endoftext|>``) as gpt-oss's does, so vLLM stops where it
    stops on the node and the reward parses a final-channel message with the tokens kept.

The task
    Every prompt asks for the same secret integer (:data:`TARGET`). Before RL the model is
    taught the response format with a uniformly random answer from :data:`ANSWERS` (a short
    supervised warm start, seeded), so it starts at a reward of about ``1 / len(ANSWERS)`` and
    can only rise by learning from the reward: the proof that the gradient's sign, the update,
    the weight sync and the sampling connect.

    python -m rft.tiny build/tiny   # model/, data/{train,eval}.jsonl, site/ (patched openrlhf); about 40 s
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rft.eval_io import atomic_write_text
from rft.prompt_spec import PromptSpec, render

REPO = Path(__file__).resolve().parents[1]

TARGET = 7
"""The answer to every prompt of the toy task."""

ANSWERS = (3, 7)
"""Answers the warm start draws uniformly from: the untrained policy is right 1 time in 2."""

HARMONY_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)
"""gpt-oss's Harmony control tokens (o200k_harmony); the ids differ at this vocabulary size."""

STOP_TOKENS = ("<|return|>", "<|call|>", "<|endoftext|>")
"""gpt-oss's ``generation_config.json`` ``eos_token_id`` (ids 200002, 200012, 199999 there)."""

REASONING_EFFORT = "low"
"""The effort the quick start trains and evaluates at (its launcher sets REASONING_EFFORT to it)."""

CHAT_TEMPLATE = (
    "<|start|>system<|message|>You are a tiny model.\n"
    "Current date: {{ strftime_now('%Y-%m-%d') }}\n\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "<|start|>developer<|message|># Instructions\n\n{{ message['content'] }}<|end|>"
    "{% else %}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
"""A chat template with gpt-oss's moving parts: today's date from ``strftime_now``, the reasoning
effort defaulting to medium, a system turn rendered as developer instructions, the assistant header."""

ANALYSIS = "Recall it."

YARN_ROPE_SCALING = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 16,
}
"""gpt-oss's YaRN settings, scaled so that original length x factor = max_position_embeddings (512)."""

TINY_CONFIG = dict(
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    num_local_experts=4,
    num_experts_per_tok=2,
    hidden_size=128,
    intermediate_size=128,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=64,
    max_position_embeddings=512,
    rope_scaling=YARN_ROPE_SCALING,
    tie_word_embeddings=False,
)
"""Sizes: 4 query heads and 2 KV heads split evenly over a tensor-parallel size of 2."""

WARM_START_STEPS = 300
WARM_START_LR = 3e-3
WARM_START_BATCH = 16


def vocabulary() -> list[str]:
    """Special tokens first, then every printable ASCII character (newline included)."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return list(HARMONY_SPECIAL_TOKENS) + chars


def prompt_text(index: int) -> str:
    """The user message of toy problem ``index``."""
    return f"Problem {index}: what is the secret number?"


def response_text(answer: int) -> str:
    """A Harmony response as gpt-oss writes it, special tokens kept, ending at ``<|return|>``."""
    return (
        f"<|channel|>analysis<|message|>{ANALYSIS}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>\\boxed{{{answer}}}<|return|>"
    )


def build_tokenizer(dest: Path):
    """Write the character-level Harmony tokenizer to ``dest`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in HARMONY_SPECIAL_TOKENS if t not in ("<|return|>", "<|endoftext|>")],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(dest))
    return tok


def _examples(tok, n: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """Token ids of ``n`` prompt+response pairs and the length of each prompt."""
    spec = PromptSpec.for_tokenizer(tok, REASONING_EFFORT)
    out = []
    for _ in range(n):
        prompt = render(tok, prompt_text(rng.randrange(10_000)), spec)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(response_text(rng.choice(ANSWERS)), add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + response_ids, len(prompt_ids)))
    return out


def warm_start(model, tok, seed: int, steps: int = WARM_START_STEPS, progress: bool = True) -> float:
    """Teach the response format with random answers; returns the last batch's loss (response tokens)."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="warm start", disable=not progress):
        batch = _examples(tok, WARM_START_BATCH, rng)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, n_prompt) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            mask[row, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def build_model(dest: Path, seed: int = 0, steps: int = WARM_START_STEPS, progress: bool = True) -> dict:
    """Write the warm-started tiny gpt-oss (bf16) with its tokenizer to ``dest``; returns a report."""
    import torch
    from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(dest)
    vocab_size = len(tok)
    config = GptOssConfig(
        **TINY_CONFIG,
        vocab_size=vocab_size,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|return|>"),
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.02)
    start = time.monotonic()
    loss = warm_start(model, tok, seed, steps=steps, progress=progress)
    stop_ids = [tok.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id
    )
    model.to(torch.bfloat16).save_pretrained(str(dest), safe_serialization=True)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab_size,
        "warm_start_steps": steps,
        "warm_start_loss": loss,
        "warm_start_seconds": round(time.monotonic() - start, 1),
        "stop_token_ids": stop_ids,
    }


def task_rows(n: int, first: int) -> list[dict]:
    """``n`` toy problems in rft's data format (``input``/``label``), numbered from ``first``."""
    return [{"input": prompt_text(i), "label": str(TARGET)} for i in range(first, first + n)]


def build(out: Path, seed: int = 0, train_rows: int = 128, eval_rows: int = 8, progress: bool = True) -> dict:
    """The model under ``out/model`` and the task under ``out/data``; skipped when already built."""
    report_path = out / "tiny_report.json"
    wanted = {"seed": seed, "train_rows": train_rows, "eval_rows": eval_rows, "config": TINY_CONFIG,
              "answers": list(ANSWERS), "target": TARGET, "template": CHAT_TEMPLATE}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("settings") == json.loads(json.dumps(wanted)):
            return report
    (out / "data").mkdir(parents=True, exist_ok=True)
    report = {"settings": wanted, "model": build_model(out / "model", seed=seed, progress=progress)}
    for name, rows in (("train.jsonl", task_rows(train_rows, 0)), ("eval.jsonl", task_rows(eval_rows, 10_000))):
        atomic_write_text(out / "data" / name, "".join(json.dumps(row) + "\n" for row in rows))
    # last: its presence means the build is whole
    atomic_write_text(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _series_digest(patches: Path) -> str:
    """sha256 over the series file and every patch it names, in order."""
    digest = hashlib.sha256()
    series = patches / "series"
    digest.update(series.read_bytes())
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            digest.update((patches / name).read_bytes())
    return digest.hexdigest()


def patched_tree(dest: Path, patches: Path = REPO / "patches") -> Path:
    """A copy of this interpreter's openrlhf 0.9.3 at ``dest``, patched by ``apply_patches.sh --target``.

    The quick start imports OpenRLHF from this copy (``PYTHONPATH``), so the environment's own
    package stays as installed. Rebuilt when the patch series changes; replaced whole, never
    left half-patched (built beside ``dest``, then renamed).
    """
    stamp = dest / ".rft-series-sha256"
    want = _series_digest(patches)
    if stamp.is_file() and stamp.read_text().strip() == want:
        return dest
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"rft.tiny: {sys.executable} cannot import openrlhf; run bash setup_cpu.sh first")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        shutil.copytree(site / "openrlhf", staging / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
        for dist_info in site.glob("openrlhf-*.dist-info"):
            shutil.copytree(dist_info, staging / dist_info.name)
        subprocess.run(
            ["bash", str(REPO / "apply_patches.sh"), "--target", str(staging), "--quiet"],
            check=True, env={**os.environ, "PYTHON": sys.executable},
        )
        (staging / stamp.name).write_text(want + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the quick start's tiny gpt-oss, tokenizer and toy task.")
    parser.add_argument("out", type=Path, help="directory to write model/ and data/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the warm start (default 0)")
    args = parser.parse_args(argv)
    report = build(args.out, seed=args.seed)
    site = patched_tree(args.out / "site")
    model = report["model"]
    print(f"tiny gpt-oss: {model['parameters']:,} parameters, vocabulary {model['vocab_size']}, "
          f"warm-start loss {model['warm_start_loss']:.3f} -> {args.out}/model, {args.out}/data; "
          f"patched openrlhf in {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
