"""Shared fixtures of the rft test suite.

What a whole CPU run needs in place of the GPU (the end-to-end test runs the quick start) is
defined once in ``rft/cpu_stand_ins.py``; this file takes the kernel stand-in and the gloo
gather ordering from there. Import boundaries that the unit tests replace:

* ``vllm`` (fixture :func:`vllm_stub`): vLLM cannot be installed without a GPU.
  OpenRLHF 0.9.3 imports it at module level in ``trainer/ray/vllm_engine.py``
  (``import vllm``, ``vllm.inputs.TokensPrompt``, ``vllm.utils.random_uuid``) and
  ``trainer/ppo_utils/experience_maker.py`` (``vllm.SamplingParams``), hence also
  in ``trainer/ppo_trainer.py`` and ``cli/train_ppo_ray.py``. The stand-in
  provides exactly those names with the same call shapes; starting an engine
  through it raises. Everything behind the boundary is OpenRLHF's real code.
* ``flash_attn_2_cuda`` (always on): the CUDA extension of flash-attn. The test
  environment builds flash-attn without it, so ``flash_attn.bert_padding`` (pure
  torch, imported by ``openrlhf.models``) is real; calling a kernel raises.

Trees: ``pristine_root`` is a copy of the installed openrlhf 0.9.3 and
``patched_root`` the same with ``patches/series`` applied (see ``tests/oprl.py``).

Prompts: ``tok`` is the quick start's tokenizer and ``clock`` the day its chat template reads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import types
import uuid
from pathlib import Path

import pytest

import oprl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for rft (subprocesses too)
from rft import cpu_stand_ins  # noqa: E402


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tests/gpu/run_gpu_lane.sh on a GPU node)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_MissingKernel = cpu_stand_ins.MissingKernel
"""A CUDA extension this machine lacks (defined with the other CPU stand-ins in rft/cpu_stand_ins.py)."""


@pytest.fixture(scope="session", autouse=True)
def flash_attn_kernels_stub():
    """Stand-in for flash-attn's CUDA extension module (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        if "flash_attn_2_cuda" not in sys.modules:
            mp.setitem(sys.modules, "flash_attn_2_cuda", _MissingKernel("flash_attn_2_cuda"))
        yield


def complete_async_gathers() -> None:
    """Make DeepSpeed's async all-gathers complete before they return (CPU, gloo runs only).

    The stand-in and its reason live in ``rft/cpu_stand_ins.py`` (:func:`ordered_gathers`).
    """
    import deepspeed.comm as ds_comm

    cpu_stand_ins.ordered_gathers(ds_comm)


class SamplingParams:
    """Keyword-only record of vLLM's sampling parameters (the fields OpenRLHF sets)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        return f"SamplingParams({self.__dict__!r})"


def TokensPrompt(prompt_token_ids, **kwargs):  # noqa: N802 - vLLM's TypedDict name
    """vLLM's TokensPrompt is a TypedDict; constructing it yields a plain dict."""
    return {"prompt_token_ids": prompt_token_ids, **kwargs}


def _engine_unavailable(*args, **kwargs):
    raise RuntimeError("vLLM engines cannot start in CPU tests (vllm import boundary is stubbed)")


def make_vllm_stub(version: str = "0.15.1") -> dict[str, types.ModuleType]:
    """Build the stand-in ``vllm`` package and its submodules used by OpenRLHF 0.9.3."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = version
    vllm.__path__ = []  # a package, so ``import vllm.x`` resolves through sys.modules
    vllm.SamplingParams = SamplingParams
    vllm.AsyncEngineArgs = _engine_unavailable
    vllm.AsyncLLMEngine = types.SimpleNamespace(from_engine_args=_engine_unavailable)
    vllm.LLM = _engine_unavailable
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    utils = types.ModuleType("vllm.utils")
    utils.random_uuid = lambda: uuid.uuid4().hex
    vllm.inputs, vllm.utils = inputs, utils
    return {"vllm": vllm, "vllm.inputs": inputs, "vllm.utils": utils}


@pytest.fixture
def vllm_stub(monkeypatch):
    """Install the ``vllm`` import-boundary stand-in for one test (see the module docstring)."""
    modules = make_vllm_stub()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield modules["vllm"]
    oprl.purge()  # modules imported against the stand-in must not leak into other tests


@pytest.fixture(scope="session")
def pristine_root(tmp_path_factory) -> Path:
    """A private copy of the pristine openrlhf 0.9.3 tree."""
    return oprl.pristine_copy(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="session")
def patched_root(tmp_path_factory) -> Path:
    """A copy of openrlhf 0.9.3 with every patch of ``patches/series`` applied."""
    root = oprl.pristine_copy(tmp_path_factory.mktemp("patched"))
    oprl.apply_series(root)
    return root


class Clock(dt.datetime):
    """datetime whose now() is a chosen day: what transformers' strftime_now reads."""

    today = dt.datetime(2026, 12, 6, 23, 59)

    @classmethod
    def now(cls, tz=None):
        return cls.today


@pytest.fixture
def clock(monkeypatch) -> type[Clock]:
    """Chat templates read the day from :class:`Clock`: set ``clock.today`` to move it."""
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    return Clock


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The quick start's character tokenizer (rft/tiny.py), whose template reads the date and effort as gpt-oss's."""
    from rft.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@contextlib.contextmanager
def one_process_gloo_world():
    """A one-process gloo group on DeepSpeed's CPU accelerator, torn down whole afterwards.

    What ZeRO-3 needs to partition and train in one test process. The environment it sets is put
    back, and DeepSpeed's cached groups (``deepspeed.utils.groups``) are cleared on the way in and
    out: they belong to the world DeepSpeed first saw, and a later world would meet groups of a
    destroyed one ("Group ... is not registered").
    """
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():  # a group some caller owns: use it as it is
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    _forget_deepspeed_groups()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_deepspeed_groups() -> None:
    from deepspeed.utils import groups

    for name, value in vars(groups).items():
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            if isinstance(value, dict):
                value.clear()
            else:
                setattr(groups, name, None)
    groups.mesh_device = None
