"""rft/openrlhf/mxfp4_load.py on its own: what actor.patch's hook decides before and around loading.

Plain unit tests: config.json files written here (or by ``tests/tiny_gptoss.py``), and a
recording stand-in for the model class where the test is about the arguments of the load, not
the load itself. The real OpenRLHF ``Actor`` loading real checkpoints through this module, with
and without ZeRO-3, is in ``tests/test_actor_patch.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from rft import contract, fast_gptoss
from rft.openrlhf import mxfp4_load

GPT_OSS_MXFP4 = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}
GPT_OSS_BF16 = {"model_type": "gpt_oss"}
LLAMA = {"model_type": "llama"}
ZERO3 = {"zero_optimization": {"stage": 3}}


def write_config(path: Path, config: dict) -> str:
    """A checkpoint folder holding only config.json (no weight: nothing may need one)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "quantization_config, expected",
    [
        ({"quant_method": "mxfp4"}, True),
        ({"quant_method": "MXFP4", "modules_to_not_convert": ["lm_head"]}, True),
        ({"quant_method": "fp8"}, False),
        ({"modules_to_not_convert": ["lm_head"]}, False),
        (None, False),
        ("mxfp4", False),  # not a mapping: not a quantization config transformers would read
    ],
)
def test_mxfp4_detection_table(quantization_config, expected):
    assert mxfp4_load.is_mxfp4_checkpoint({"quantization_config": quantization_config}) is expected
    assert mxfp4_load.is_mxfp4_checkpoint({}) is False


def test_mxfp4_detected_from_config_json_alone(tmp_path):
    from tiny_gptoss import build_tiny_gptoss

    ckpt = build_tiny_gptoss(tmp_path / "mxfp4", mxfp4=True, seed=0)
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(ckpt.path / "config.json", only_config / "config.json")  # no weights at all

    for path in (ckpt.path, only_config):
        config = mxfp4_load.read_checkpoint_config(str(path))
        assert config["model_type"] == "gpt_oss" and mxfp4_load.is_mxfp4_checkpoint(config)
    bf16 = mxfp4_load.read_checkpoint_config(str(build_tiny_gptoss(tmp_path / "bf16", mxfp4=False, seed=0).path))
    assert bf16["model_type"] == "gpt_oss" and not mxfp4_load.is_mxfp4_checkpoint(bf16)
    assert not mxfp4_load.is_mxfp4_checkpoint(mxfp4_load.read_checkpoint_config(write_config(tmp_path / "l", LLAMA)))
    # an unreadable path is left to from_pretrained, which reports it
    assert mxfp4_load.read_checkpoint_config(str(tmp_path / "missing")) == {}


def test_mxfp4_detected_for_hub_id_from_cache(tmp_path, monkeypatch):
    """A hub id resolves through the hub cache; only config.json is fetched (offline here)."""
    import transformers.utils.hub as hf_hub_utils

    repo = tmp_path / "hub" / "models--tiny-org--tiny-gptoss"
    write_config(repo / "snapshots" / ("0" * 40), GPT_OSS_MXFP4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_hub_utils, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_hub_utils, "_is_offline_mode", True)

    config = mxfp4_load.read_checkpoint_config("tiny-org/tiny-gptoss")
    assert config["model_type"] == "gpt_oss" and mxfp4_load.is_mxfp4_checkpoint(config)


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])  # transformers 4.57.6 applies the sinks in both
def test_sink_aware_attention_accepted(attn):
    assert mxfp4_load.check_gpt_oss_settings("/ckpt", attn, packing_samples=False) is None
    assert attn in mxfp4_load.GPT_OSS_ATTN_IMPLEMENTATIONS


@pytest.mark.parametrize(
    "attn, packing, fix",
    [
        ("flash_attention_2", False, "pass --attn_implementation eager"),
        ("sdpa", False, "pass --attn_implementation eager"),
        (None, False, "pass --attn_implementation eager"),
        ("eager", True, "remove --packing_samples"),
    ],
)
def test_settings_that_drop_the_sinks_are_refused_in_one_line(attn, packing, fix):
    with pytest.raises(ValueError) as err:
        mxfp4_load.check_gpt_oss_settings("/ckpt/gpt-oss-20b", attn, packing)
    message = str(err.value)
    assert message.startswith("/ckpt/gpt-oss-20b: ") and message.endswith(fix) and "\n" not in message
    assert "sinks" in message


@pytest.mark.parametrize(
    "param_dtype, load_in_4bit, fix",
    [("bf16", True, "remove --load_in_4bit"), ("fp16", False, "pass --param_dtype bf16 (got 'fp16')")],
)
def test_mxfp4_incompatible_settings_refused_in_one_line(param_dtype, load_in_4bit, fix):
    with pytest.raises(ValueError) as err:
        mxfp4_load.check_mxfp4_settings("/ckpt/gpt-oss-20b", param_dtype, load_in_4bit)
    message = str(err.value)
    assert message.startswith("/ckpt/gpt-oss-20b is an MXFP4 checkpoint") and message.endswith(fix)
    assert "\n" not in message
    assert mxfp4_load.check_mxfp4_settings("/ckpt", "bf16", False) is None


@pytest.mark.parametrize(
    "config, kwargs, fix",
    [
        (GPT_OSS_BF16, {"attn_implementation": "sdpa"}, "--attn_implementation eager"),
        (GPT_OSS_MXFP4, {"packing_samples": True}, "remove --packing_samples"),
        (GPT_OSS_MXFP4, {"load_in_4bit": True}, "remove --load_in_4bit"),
        (GPT_OSS_MXFP4, {"param_dtype": "fp16"}, "pass --param_dtype bf16 (got 'fp16')"),
    ],
)
def test_the_loader_refuses_when_built(tmp_path, config, kwargs, fix):
    """Building the loader reads config.json and refuses: before the Actor touches any weight."""
    settings = {"attn_implementation": "eager", "packing_samples": False, "param_dtype": "bf16",
                "load_in_4bit": False, "ds_config": None, **kwargs}
    with pytest.raises(ValueError, match=r".*" + fix.replace("(", r"\(").replace(")", r"\)") + "$"):
        mxfp4_load.CheckpointLoader(write_config(tmp_path / "ckpt", config), **settings)


def test_other_models_keep_any_setting(tmp_path):
    loader = mxfp4_load.CheckpointLoader(write_config(tmp_path / "llama", LLAMA), "sdpa", True, "fp16", True, ZERO3)
    assert (loader.gpt_oss, loader.mxfp4) == (False, False)


# ----------------------------------------------------------------------------- loading


class RecordingModelClass:
    """Stands in for AutoModelForCausalLM: records each from_pretrained call and the ZeRO-3 state
    transformers would see during it, and returns a tiny module."""

    def __init__(self):
        self.calls: list[dict] = []

    def from_pretrained(self, pretrain, **kwargs):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        self.calls.append({"pretrain": pretrain, "zero3_visible": is_deepspeed_zero3_enabled(), **kwargs})
        return nn.Linear(2, 2)


PRISTINE_KWARGS = {"trust_remote_code": True, "attn_implementation": "eager", "quantization_config": None,
                   "torch_dtype": torch.bfloat16, "device_map": None}
"""What 0.9.3's Actor passes to from_pretrained (models/actor.py:92-99) with its defaults."""


@pytest.fixture
def no_live_hf_ds_config():
    from transformers.integrations import deepspeed as hf_deepspeed

    hf_deepspeed.unset_hf_deepspeed_config()
    yield
    hf_deepspeed.unset_hf_deepspeed_config()


@pytest.mark.parametrize("config", [LLAMA, GPT_OSS_BF16], ids=["llama", "gpt-oss-bf16"])
@pytest.mark.parametrize("ds_config", [None, ZERO3], ids=["no-ds", "zero3"])
def test_other_checkpoints_load_with_the_pristine_call(tmp_path, monkeypatch, config, ds_config):
    monkeypatch.delenv(contract.ENV_FAST_GPTOSS, raising=False)
    path = write_config(tmp_path / "ckpt", config)
    loader = mxfp4_load.CheckpointLoader(path, "eager", False, "bf16", False, ds_config)
    model_class = RecordingModelClass()
    loader.from_pretrained(model_class, path, **PRISTINE_KWARGS)
    assert model_class.calls == [{"pretrain": path, "zero3_visible": False, **PRISTINE_KWARGS}]
    assert loader.hf_ds_config is None


def test_mxfp4_loads_dequantized_in_place_without_zero3(tmp_path):
    path = write_config(tmp_path / "ckpt", GPT_OSS_MXFP4)
    loader = mxfp4_load.CheckpointLoader(path, "eager", False, "bf16", False, None)
    model_class = RecordingModelClass()
    loader.from_pretrained(model_class, path, **PRISTINE_KWARGS)
    (call,) = model_class.calls
    quant = call.pop("quantization_config")
    assert type(quant).__name__ == "Mxfp4Config" and quant.dequantize is True
    assert call == {"pretrain": path, "zero3_visible": False,
                    **{k: v for k, v in PRISTINE_KWARGS.items() if k != "quantization_config"}}


@pytest.mark.parametrize("device_map", [None, "cpu", {"": "cpu"}])
def test_mxfp4_under_zero3_loads_on_cpu_then_partitions(tmp_path, monkeypatch, no_live_hf_ds_config, device_map):
    """No ZeRO-3 config is visible while loading (transformers refuses device_map then); the
    loader makes one afterwards, holds it, and partitions the loaded model with it."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    partitioned = []
    monkeypatch.setattr(mxfp4_load, "partition_for_zero3",
                        lambda model, ds_config: partitioned.append((model, ds_config, is_deepspeed_zero3_enabled())))
    path = write_config(tmp_path / "ckpt", GPT_OSS_MXFP4)
    loader = mxfp4_load.CheckpointLoader(path, "eager", False, "bf16", False, ZERO3)
    model_class = RecordingModelClass()
    model = loader.from_pretrained(model_class, path, **dict(PRISTINE_KWARGS, device_map=device_map))
    (call,) = model_class.calls
    assert call["device_map"] == ("cpu" if device_map is None else device_map)  # a given map is kept
    assert call["zero3_visible"] is False
    assert partitioned == [(model, ZERO3, True)]
    assert loader.hf_ds_config is not None and is_deepspeed_zero3_enabled()
    del loader  # the Actor's __init__ returns: no config outlives it, as 0.9.3's dschf
    assert not is_deepspeed_zero3_enabled()


def test_a_zero3_config_held_elsewhere_is_hidden_while_loading_and_restored(
    tmp_path, monkeypatch, no_live_hf_ds_config
):
    from transformers.integrations import deepspeed as hf_deepspeed

    monkeypatch.setattr(mxfp4_load, "partition_for_zero3", lambda model, ds_config: None)
    held_elsewhere = hf_deepspeed.HfDeepSpeedConfig(ZERO3)
    path = write_config(tmp_path / "ckpt", GPT_OSS_MXFP4)
    loader = mxfp4_load.CheckpointLoader(path, "eager", False, "bf16", False, ZERO3)
    model_class = RecordingModelClass()
    loader.from_pretrained(model_class, path, **PRISTINE_KWARGS)
    assert model_class.calls[0]["zero3_visible"] is False
    assert loader.hf_ds_config is None  # the other holder's config is back in place: no second one
    assert hf_deepspeed._hf_deepspeed_config_weak_ref() is held_elsewhere


def test_hf_zero3_suspended_restores_after_an_error(no_live_hf_ds_config):
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    with mxfp4_load.hf_zero3_suspended():  # nothing registered: nothing to hide
        assert not is_deepspeed_zero3_enabled()
    live = hf_deepspeed.HfDeepSpeedConfig(ZERO3)
    with pytest.raises(RuntimeError, match="load failed"):
        with mxfp4_load.hf_zero3_suspended():
            assert not is_deepspeed_zero3_enabled()
            raise RuntimeError("load failed")
    assert hf_deepspeed._hf_deepspeed_config_weak_ref() is live and is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("ds_config, expected", [(None, False), (ZERO3, True),
                                                 ({"zero_optimization": {"stage": 2}}, False)])
def test_is_zero3(ds_config, expected):
    assert mxfp4_load.is_zero3(ds_config) is expected


# ----------------------------------------------------------------------------- the fast gpt-oss hook


@pytest.mark.parametrize("value, expected", [(None, False), ("", False), ("0", False), ("1", True),
                                             ("experts", True), ("off", True)])
def test_fast_gptoss_requested_by_anything_but_unset_or_zero(value, expected):
    """As the hook always read it: ``off`` reaches rft.fast_gptoss, which installs nothing for it."""
    environ = {} if value is None else {"RFT_FAST_GPTOSS": value}
    assert mxfp4_load.fast_gptoss_requested(environ) is expected


def test_the_setting_name_is_the_contracts_and_fast_gptoss_reads_it():
    assert contract.ENV_FAST_GPTOSS == "RFT_FAST_GPTOSS" == fast_gptoss.SETTING


@pytest.mark.parametrize("config, value, installed", [
    (GPT_OSS_BF16, "1", True), (GPT_OSS_MXFP4, "experts", True), (GPT_OSS_BF16, "0", False),
    (GPT_OSS_BF16, None, False), (LLAMA, "1", False),
])
def test_fast_paths_installed_on_gpt_oss_when_asked(tmp_path, monkeypatch, capsys, config, value, installed):
    seen = []
    monkeypatch.setattr(fast_gptoss, "install_from_env", lambda model: seen.append(model) or {"experts": 7})
    if value is None:
        monkeypatch.delenv(contract.ENV_FAST_GPTOSS, raising=False)
    else:
        monkeypatch.setenv(contract.ENV_FAST_GPTOSS, value)
    path = write_config(tmp_path / "ckpt", config)
    model = mxfp4_load.CheckpointLoader(path, "eager", False, "bf16", False, None).from_pretrained(
        RecordingModelClass(), path, **PRISTINE_KWARGS
    )
    assert seen == ([model] if installed else [])
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rft fast gpt-oss")]
    assert logged == ([f"rft fast gpt-oss (RFT_FAST_GPTOSS={value}): attention 0, experts 7, norms 0, leaves 0, "
                       "resident 0"] if installed else [])
