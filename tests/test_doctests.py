"""Every usage example in a docstring of rft's modules still runs as written (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ["reward_func_em", "rft.data_prep", "rft.eval_stats", "rft.fast_gptoss", "rft.openrlhf.eval_modes",
           "rft.openrlhf.native_lora", "rft.openrlhf.rollout_rewards", "rft.openrlhf.vllm_lora_delta",
           "summarize_actor_zero3"]


def test_the_list_names_every_module_with_examples():
    files = [p for p in [*REPO.glob("*.py"), *(REPO / "rft").rglob("*.py"), *(REPO / "bench").glob("*.py")]
             if ">>> " in p.read_text()]
    named = {m.rsplit(".", 1)[-1] for m in MODULES}
    assert sorted(p.stem for p in files if p.stem not in named) == []


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    assert result.attempted > 0
    sys.modules.pop("summarize_actor_zero3", None)
