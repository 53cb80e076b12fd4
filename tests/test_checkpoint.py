"""rft/openrlhf/checkpoint.py on its own: what save_model.patch decides and does around a LoRA save.

Plain unit tests on files in ``tmp_path`` and on a tiny Llama with a PEFT adapter, without
DeepSpeed partitioning. The real ``DeepspeedStrategy.save_model`` / ``save_ckpt`` / ``load_ckpt``
of OpenRLHF 0.9.3 calling this module on a ZeRO-3 engine (one and two ranks) are tested in
``tests/test_patch_offload_save.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rft.openrlhf import checkpoint

LEFT_OVER = {
    "model-00001-of-00002.safetensors": 3000,
    "model-00002-of-00002.safetensors": 2000,
    "model.safetensors.index.json": 100,
    "pytorch_model-00001-of-00002.bin": 700,
    "pytorch_model.bin.index.json": 50,
}
"""Full-model files a save_pretrained of a whole model leaves: shards of both formats and their indexes."""

ADAPTER_FILES = {"adapter_config.json": 2, "adapter_model.bin": 40, "adapter_model.safetensors": 40,
                 "config.json": 2, "tokenizer.json": 2, "notes.txt": 4}
"""What a LoRA save writes (and a user's own file): never a full-model file."""


def fill(folder: Path, files: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in files.items():
        (folder / name).write_bytes(b"x" * size)
    return folder


def tiny_lora(targets: tuple[str, ...] = ("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


# ----------------------------------------------------------------------------- full-model files


def test_full_model_files_are_found_by_name_and_size(tmp_path):
    folder = fill(tmp_path / "odd [dir]*", {**LEFT_OVER, **ADAPTER_FILES})  # glob characters in the path
    assert checkpoint.full_model_files(str(folder)) == LEFT_OVER


@pytest.mark.parametrize("files, expected", [
    (LEFT_OVER, True),  # a full save: kept
    ({**LEFT_OVER, "adapter_config.json": 2}, False),  # shards beside an adapter: left over
    ({"adapter_config.json": 2}, False),
    ({}, False),
])
def test_a_full_save_is_a_folder_with_a_full_model_and_no_adapter(tmp_path, files, expected):
    assert checkpoint.holds_full_model_only(str(fill(tmp_path / "ckpt", files))) is expected


def test_files_left_beside_an_adapter_are_removed_with_one_log_line(tmp_path):
    folder = fill(tmp_path / "ckpt", {**LEFT_OVER, **ADAPTER_FILES})
    lines: list[str] = []
    checkpoint.remove_full_model_files(str(folder), held_full_model=False, log=lines.append)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)
    assert lines == [
        f"save_model: removed 5 full-model files (5850 bytes) beside the LoRA adapter in {folder}: "
        "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json, "
        "pytorch_model-00001-of-00002.bin, pytorch_model.bin.index.json"
    ]


def test_a_full_save_from_before_is_kept_and_reported(tmp_path):
    folder = fill(tmp_path / "ckpt", {**LEFT_OVER, **ADAPTER_FILES})
    lines: list[str] = []
    checkpoint.remove_full_model_files(str(folder), held_full_model=True, log=lines.append)
    assert sorted(p.name for p in folder.iterdir()) == sorted({**LEFT_OVER, **ADAPTER_FILES})
    assert lines == [f"save_model: {folder} also holds a full model saved earlier (5 files, 5850 bytes); kept"]


@pytest.mark.parametrize("files", [LEFT_OVER, {"adapter_config.json": 2, "config.json": 2}], ids=["no-adapter", "clean"])
def test_nothing_is_removed_or_logged_without_both_an_adapter_and_full_files(tmp_path, files):
    folder = fill(tmp_path / "ckpt", files)
    lines: list[str] = []
    checkpoint.remove_full_model_files(str(folder), held_full_model=False, log=lines.append)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files) and lines == []


# ----------------------------------------------------------------------------- what a save gathers


def test_adapter_only_for_lora_without_tensor_parallelism_or_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert checkpoint.adapter_only(tiny_lora(), tensor_parallel_size=1) is True
    assert checkpoint.adapter_only(tiny_lora(), tensor_parallel_size=2) is False
    assert checkpoint.adapter_only(tiny_lora(("q_proj", "embed_tokens")), tensor_parallel_size=1) is False
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert checkpoint.adapter_only(plain, tensor_parallel_size=1) is False


def test_trainable_names_are_the_adapters():
    names = checkpoint.trainable_names(tiny_lora())
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A.default.weight" in n or ".lora_B.default.weight" in n for n in names)


def test_gather_trainable_copies_the_adapter_on_rank_0_only():
    """Without ZeRO-3 partitions nothing is gathered; rank 0 gets CPU copies, other ranks nothing."""
    model = tiny_lora()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert checkpoint.gather_trainable(model, is_rank_0=False) == {}
    gathered = checkpoint.gather_trainable(model, is_rank_0=True, group_size=3)  # several groups
    assert gathered.keys() == expected.keys()
    assert all(torch.equal(gathered[n], v) and gathered[n].device.type == "cpu" for n, v in expected.items())
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    assert all(torch.equal(gathered[n], v) for n, v in expected.items())  # copies, not views


# ----------------------------------------------------------------------------- loading a checkpoint


def test_a_checkpoint_without_frozen_weights_loads():
    model, source = tiny_lora(), tiny_lora()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    saved = {n: v for n, v in source.state_dict().items() if "lora_" in n}
    frozen_before = {n: v.clone() for n, v in model.state_dict().items() if "lora_" not in n}
    checkpoint.load_without_frozen(saved, model)
    state = model.state_dict()
    assert all(torch.equal(state[n], v) for n, v in saved.items())
    assert all(torch.equal(state[n], v) for n, v in frozen_before.items())  # frozen weights untouched


def test_a_complete_checkpoint_still_loads():
    model, source = tiny_lora(), tiny_lora()
    checkpoint.load_without_frozen(source.state_dict(), model)
    assert all(torch.equal(model.state_dict()[n], v) for n, v in source.state_dict().items())


def test_a_missing_trainable_or_an_extra_key_is_refused():
    model = tiny_lora()
    state = {n: v for n, v in model.state_dict().items() if "lora_" in n}
    missing = dict(state)
    missing.pop(sorted(missing)[0])
    with pytest.raises(RuntimeError, match=r"^checkpoint does not match the model: 1 keys, e\.g\. \['base_model"):
        checkpoint.load_without_frozen(missing, model)
    with pytest.raises(RuntimeError, match=r"1 keys, e\.g\. \['extra.weight'\]"):
        checkpoint.load_without_frozen({**state, "extra.weight": torch.zeros(1)}, model)
