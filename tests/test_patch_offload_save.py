"""offload_cli.patch and save_model.patch on the real OpenRLHF 0.9.3 code.

* The real train_ppo_ray argument parser and validation (tests/parser_util.py runs the file's
  own ``__main__`` block) accept ``--offload`` with ZeRO-3 and refuse it otherwise; the strategy
  built from those arguments by OpenRLHF's ``get_strategy`` puts the actor's ZeRO-3 parameters
  on CPU, in a config DeepSpeed's own schema accepts.
* ``DeepspeedStrategy.save_model`` / ``save_ckpt`` / ``load_ckpt`` run for real on a DeepSpeed
  ZeRO-3 engine (CPU accelerator, one-process gloo group) wrapping a tiny Llama with a PEFT
  LoRA adapter, built through the strategy's own ``prepare``. The only stand-in is
  ``torch.cuda.synchronize``, a no-op here: a CPU run has no CUDA stream to wait for.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch

import conftest
import oprl
from parser_util import build_train_parser, parse_train_args

BASE_ARGV = ["--pretrain", "org/model", "--remote_rm_url", "reward.py", "--zero_stage", "3"]


def xfail_pristine(reason: str, raises: type[BaseException]) -> list:
    """("pristine", "patched"), where the pristine run must fail with ``raises`` (strict: an unexpected
    pass fails, and so does a failure of another type)."""
    return [pytest.param("pristine", marks=pytest.mark.xfail(strict=True, reason=reason, raises=raises)), "patched"]


@pytest.mark.parametrize("root_name", xfail_pristine("0.9.3 has no --offload flag", SystemExit))
def test_cli_accepts_offload(request, root_name):
    root = request.getfixturevalue(f"{root_name}_root")
    assert parse_train_args(root, BASE_ARGV + ["--offload"]).offload is True
    assert parse_train_args(root, BASE_ARGV).offload is False


@pytest.mark.parametrize("root_name", ["pristine", "patched"])
def test_cli_without_offload_parses_as_before(request, root_name):
    args = parse_train_args(request.getfixturevalue(f"{root_name}_root"), BASE_ARGV + ["--adam_offload"])
    assert args.adam_offload is True and args.zero_stage == 3 and args.remote_rm_url == ["reward.py"]


def test_cli_refuses_offload_without_zero3(patched_root, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(patched_root, ["--pretrain", "org/model", "--zero_stage", "2", "--offload"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--offload" in err and "--zero_stage 3" in err


def test_parser_helper_returns_a_usable_parser(patched_root):
    parser = build_train_parser(patched_root)
    args = parser.parse_args(["--pretrain", "org/model", "--offload"])
    assert args.offload is True and args.pretrain == "org/model"


def test_canary_pristine_cli_hooks():
    """The 0.9.3 lines the patch inserts after; if this fails, remake offload_cli.patch (and retire
    it if upstream grew its own --offload)."""
    source = (oprl.SITE / "openrlhf" / "cli" / "train_ppo_ray.py").read_text()
    assert 'parser.add_argument("--adam_offload", action="store_true", default=False, help="Offload Adam Optimizer")' in source
    assert '"--offload"' not in source


# ---------------------------------------------------------------- --offload reaches DeepSpeed


@pytest.mark.parametrize(
    "root_name", xfail_pristine("0.9.3 hard-codes offload=False in the train config", AssertionError)
)
def test_offload_reaches_the_actor_zero3_config(request, root_name):
    root = request.getfixturevalue(f"{root_name}_root")
    args = parse_train_args(root, BASE_ARGV)
    args.offload = True  # what --offload sets (test_cli_accepts_offload); pristine argparse refuses the flag
    oprl.load(root, "openrlhf.utils.deepspeed.deepspeed")
    strategy = sys.modules["openrlhf.utils"].get_strategy(args)
    actor_config = strategy.get_ds_train_config(is_actor=True)
    assert actor_config["zero_optimization"]["stage"] == 3
    assert actor_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DeepSpeedZeroConfig(**actor_config["zero_optimization"]).offload_param.device == "cpu"
    # Only the actor: a critic built from the same strategy keeps its parameters on GPU.
    assert strategy.get_ds_train_config(is_actor=False)["zero_optimization"]["offload_param"]["device"] == "none"


@pytest.mark.parametrize("root_name", ["pristine", "patched"])
def test_without_offload_the_config_is_unchanged(request, root_name):
    root = request.getfixturevalue(f"{root_name}_root")
    args = parse_train_args(root, BASE_ARGV + ["--adam_offload"])
    oprl.load(root, "openrlhf.utils.deepspeed.deepspeed")
    config = sys.modules["openrlhf.utils"].get_strategy(args).get_ds_train_config(is_actor=True)
    assert config["zero_optimization"]["offload_param"]["device"] == "none"
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# ---------------------------------------------------------------- a real ZeRO-3 LoRA engine


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group, as DeepSpeed's CPU accelerator needs (reused if one exists)."""
    with conftest.one_process_gloo_world():
        yield


@pytest.fixture
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "the", "answer", "is", "42"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_engine(root, lora: bool = True, targets: tuple = ("q_proj", "v_proj")):
    """The strategy and actor of ``root``: tiny Llama (+ LoRA on q/v), prepared by the strategy's
    own ZeRO-3 path; LoRA B matrices are random so the adapter is not all zeros."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    ds_module = oprl.load(root, "openrlhf.utils.deepspeed.deepspeed")
    actor_cls = sys.modules["openrlhf.models"].Actor
    args = argparse.Namespace(
        param_dtype="bf16", zero_stage=3, ds_tensor_parallel_size=1, local_rank=-1, offload=False,
        adam_offload=False, lora_rank=4 if lora else 0,
    )
    world_size = torch.distributed.get_world_size()  # one sample per rank and step
    strategy = ds_module.DeepspeedStrategy(
        seed=0, max_norm=1.0, micro_train_batch_size=1, train_batch_size=world_size, zero_stage=3, args=args
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)
    expected = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    actor, _, _ = strategy.prepare((actor_cls(model), optim, None))
    return ds_module, strategy, actor, expected


class GatherCounter:
    """Counts the elements DeepSpeed gathers through zero.GatheredParameters (then gathers them)."""

    def __init__(self, monkeypatch):
        import deepspeed

        self.numel = 0
        real = deepspeed.zero.GatheredParameters
        counter = self

        def counting(params, *args, **kwargs):
            params = list(params) if isinstance(params, (list, tuple)) else [params]
            if kwargs.get("enabled", True):
                counter.numel += sum(getattr(p, "ds_numel", p.numel()) for p in params if p is not None)
            return real(params, *args, **kwargs)

        monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)


SHARDS = {
    "model-00001-of-00002.safetensors": 3000,
    "model-00002-of-00002.safetensors": 2000,
    "model.safetensors.index.json": 100,
    "pytorch_model-00001-of-00002.bin": 700,
    "pytorch_model.bin.index.json": 50,
}


@pytest.fixture(scope="module", params=["pristine", "patched"])
def lora_save(request, gloo_group, tmp_path_factory):
    """One ZeRO-3 LoRA save per tree into a directory that already holds a LoRA save plus leaked
    full-model shards (the state the shard leak leaves behind)."""
    root = request.getfixturevalue(f"{request.param}_root")
    out = tmp_path_factory.mktemp(f"save_{request.param}") / "ckpt"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    for name, size in SHARDS.items():
        (out / name).write_bytes(b"x" * size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        _, strategy, actor, expected = build_engine(root)
        counter = GatherCounter(mp)
        lines = []
        mp.setattr(strategy, "print", lambda *msg: lines.append(" ".join(map(str, msg))))
        strategy.save_model(actor, tiny_tokenizer(), str(out))
        total = sum(getattr(p, "ds_numel", p.numel()) for p in actor.model.module.parameters())
    return {
        "tree": request.param, "out": out, "expected": expected, "gathered": counter.numel,
        "total": total, "log": lines,
    }


@pytest.mark.slow
def test_lora_save_writes_the_adapter(lora_save):
    out = lora_save["out"]
    for name in ("adapter_config.json", "adapter_model.bin", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_model.safetensors").exists()
    saved = torch.load(out / "adapter_model.bin", map_location="cpu")
    expected = {k.replace(".default", ""): v for k, v in lora_save["expected"].items()}
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key  # the adapter's exact (bf16) weights


def leaked_shards_left(result: dict) -> list[str]:
    return sorted(name for name in SHARDS if (result["out"] / name).exists())


def lora_params_numel(result: dict) -> int:
    return sum(v.numel() for v in result["expected"].values())


@pytest.mark.slow
def test_lora_save_removes_leaked_shards_and_logs_bytes(lora_save):
    if lora_save["tree"] == "pristine":
        assert leaked_shards_left(lora_save) == sorted(SHARDS)  # 0.9.3 leaves them all
        return
    assert leaked_shards_left(lora_save) == []
    assert (lora_save["out"] / "notes.txt").read_text() == "kept"
    (line,) = [m for m in lora_save["log"] if "removed" in m]
    assert f"removed {len(SHARDS)} full-model files ({sum(SHARDS.values())} bytes)" in line


@pytest.mark.slow
def test_lora_save_gathers_only_the_adapter(lora_save):
    lora = lora_params_numel(lora_save)
    if lora_save["tree"] == "pristine":
        assert lora_save["gathered"] >= lora_save["total"]  # 0.9.3 gathers the whole model
        return
    assert lora_save["gathered"] == lora < lora_save["total"] / 10


@pytest.mark.slow
@pytest.mark.parametrize("root_name", ["pristine", "patched"])
def test_legitimate_full_save_is_never_touched(request, root_name, gloo_group, no_cuda_sync, tmp_path):
    """A reused directory holding a full model (no adapter) keeps its weights after a LoRA save,
    and a full (non-LoRA) save keeps the weights it writes."""
    root = request.getfixturevalue(f"{root_name}_root")
    full = tmp_path / "full"
    _, strategy, actor, _ = build_engine(root, lora=False)
    strategy.save_model(actor, tiny_tokenizer(), str(full))
    written = sorted(p.name for p in full.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors")
    assert written, "the full save wrote no weights"
    sizes = {name: (full / name).stat().st_size for name in written}

    _, strategy, actor, _ = build_engine(root, lora=True)
    strategy.save_model(actor, tiny_tokenizer(), str(full))
    assert (full / "adapter_model.bin").is_file()
    assert {name: (full / name).stat().st_size for name in written} == sizes


@pytest.mark.slow
def test_adapter_on_embeddings_still_saves_frozen_embedding_weights(patched_root, gloo_group, no_cuda_sync, monkeypatch, tmp_path):
    """PEFT saves the (frozen) embedding weights when LoRA targets embeddings: the patched save then
    keeps 0.9.3's full gather, so those weights are in the adapter file."""
    _, strategy, actor, _ = build_engine(patched_root, targets=("q_proj", "embed_tokens"))
    counter = GatherCounter(monkeypatch)
    strategy.save_model(actor, tiny_tokenizer(), str(tmp_path / "emb"))
    total = sum(p.ds_numel for p in actor.model.module.parameters())
    assert counter.numel >= total
    saved = torch.load(tmp_path / "emb" / "adapter_model.bin", map_location="cpu")
    embedding = [key for key in saved if "embed_tokens" in key and "lora" not in key]
    assert embedding and all(saved[key].numel() == 64 * 32 for key in embedding)


def frozen_fragments(ckpt_dir) -> list:
    states = sorted(ckpt_dir.rglob("*model_states.pt"))
    assert states
    return [torch.load(p, map_location="cpu", weights_only=False).get("frozen_param_fragments") for p in states]


@pytest.mark.slow
@pytest.mark.parametrize(
    "root_name", xfail_pristine("0.9.3 stores every frozen base weight in DeepSpeed checkpoints", AssertionError)
)
def test_lora_ds_checkpoint_without_frozen_weights_round_trips(request, root_name, gloo_group, no_cuda_sync, tmp_path):
    root = request.getfixturevalue(f"{root_name}_root")
    _, strategy, actor, expected = build_engine(root)
    strategy.save_ckpt(actor.model, str(tmp_path / "_actor"), tag="global_step1", max_num=3, max_mem=1000)
    assert frozen_fragments(tmp_path / "_actor") == [None]

    # Resume into a fresh engine whose adapter differs: the checkpoint brings the adapter back.
    _, strategy2, actor2, _ = build_engine(root)
    import deepspeed

    with torch.no_grad():
        for name, param in actor2.model.module.named_parameters():
            if param.requires_grad:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.zero_()
    strategy2.load_ckpt(actor2.model, str(tmp_path / "_actor"))
    for name, param in actor2.model.module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                assert torch.equal(param.detach().cpu(), expected[name]), name


def test_canary_pristine_save_hooks():
    """The 0.9.3 lines save_model.patch rewrites; if this fails, remake the patch (and retire its
    parts that upstream now does: offload wiring, adapter-only gather, frozen-free checkpoints)."""
    source = (oprl.SITE / "openrlhf" / "utils" / "deepspeed" / "deepspeed.py").read_text()
    for line in (
        "            offload=False,\n",
        "        if self.args.zero_stage > 2 or self.args.ds_tensor_parallel_size > 1:\n",
        "            if isinstance(model_to_save, PeftModel):\n",
        "        model.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)\n",
    ):
        assert line in source


@pytest.mark.slow
def test_two_rank_zero3_lora_save(patched_root, tmp_path):
    """Two processes, each holding half of every parameter: the adapter-only gather and the rank-0
    file work give the exact adapter, and no rank waits forever (OpenRLHF calls save_model on all)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    for name, size in SHARDS.items():
        (out / name).write_bytes(b"x" * size)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = oprl.REPO / "tests" / "zero3_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(patched_root), str(out), str(rank), "2", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    expected = torch.load(tmp_path / "expected.pt", map_location="cpu")
    saved = torch.load(out / "adapter_model.bin", map_location="cpu")
    assert sorted(saved) == sorted(k.replace(".default", "") for k in expected)
    for key, value in expected.items():
        got = saved[key.replace(".default", "")]
        # on a mismatch, say whose values were saved under this name (another tensor's, or none)
        same = [k for k, v in expected.items() if v.shape == got.shape and torch.equal(v, got)]
        assert torch.equal(got, value), f"{key}: saved values equal {same or 'no expected tensor'}\n" + logs[0][-2000:]
    assert [name for name in SHARDS if (out / name).exists()] == []
    assert sum("removed 5 full-model files" in log for log in logs) == 1  # rank 0 only
