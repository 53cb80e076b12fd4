"""Every name rft's pieces exchange is defined once, in rft/contract.py, and every consumer uses it.

A run's files, the environment variables the launcher hands to the trainer and the reward's log
keys cross process and package boundaries (launcher shell, patched OpenRLHF, Ray actors, vLLM
workers, check_run.py, the eval). Written twice they drift silently; these tests fail instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import reward_func_em
from rft import contract, metrics_schema

REPO = Path(__file__).resolve().parents[1]
SHARED_STRINGS = {
    name: value for name, value in vars(contract).items()
    if name.isupper() and isinstance(value, str) and (name.startswith("ENV_") or "." in value)
}
"""File names and environment-variable names: the strings that must be written only in contract.py."""


def _python_sources() -> list[Path]:
    files = sorted((REPO / "rft").rglob("*.py")) + sorted(REPO.glob("*.py"))
    return [f for f in files if f.name != "contract.py" and "cpu_site" not in f.parts]


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_the_shared_strings_are_what_the_contract_names():
    assert SHARED_STRINGS["METRICS_FILE"] == "training_metrics.jsonl"
    assert SHARED_STRINGS["ENV_METRICS_DIR"] == "METRICS_LOG_DIR"
    assert len(SHARED_STRINGS) >= 10


@pytest.mark.parametrize("path", _python_sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_writes_a_shared_name_itself(path):
    """rft's modules and scripts import the names; none spells one out (docstrings may mention them)."""
    written = {name for name, value in SHARED_STRINGS.items() if value in _string_constants(path)}
    assert not written, f"{path.name} spells out {sorted(written)}: import them from rft.contract"


@pytest.mark.parametrize("patch", sorted((REPO / "patches").glob("*.patch")), ids=lambda p: p.name)
def test_no_patch_writes_a_shared_name_itself(patch):
    added = "\n".join(line[1:] for line in patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++"))
    quoted = {name for name, value in SHARED_STRINGS.items() if f'"{value}"' in added or f"'{value}'" in added}
    assert not quoted, f"{patch.name} spells out {sorted(quoted)}: the hook it calls imports them from rft.contract"


def test_the_launcher_hands_every_run_log_variable_to_the_trainer():
    """grpo_common.sh is shell and cannot import: it must set and forward each variable by that name."""
    launcher = (REPO / "grpo_common.sh").read_text()
    runtime_env = launcher[launcher.index("rft_tool runtime-env"):]
    runtime_env = runtime_env[:runtime_env.index(")\"")]
    for name in contract.RUN_LOG_ENV_VARS + contract.LORA_SYNC_ENV_VARS:
        assert re.search(rf"\b{name}\b", runtime_env), f"grpo_common.sh does not forward {name} to the Ray job"
    for name in (contract.ENV_METRICS_DIR, contract.ENV_SAMPLES_DIR, contract.ENV_SPIKE_PATH):
        assert re.search(rf"^{name}=\"\$\{{{name}:-", launcher, re.M), f"grpo_common.sh does not set {name}"
    assert f"/{contract.SPIKE_FILE}" in launcher and f"/{contract.RUN_MANIFEST}" in launcher


def test_reward_keys_reach_the_schema():
    """The reward defines its keys; each 0/1 key is a logged share and each parse method a share too."""
    assert set(contract.SHARE_KEYS) <= set(reward_func_em.EXTRA_LOG_KEYS)
    assert contract.EXTRA_LOG_KEYS is reward_func_em.EXTRA_LOG_KEYS
    for key in contract.SHARE_KEYS + tuple(f"parse_method_{name}" for name in contract.PARSE_METHOD_CODES):
        assert metrics_schema.lookup(key) is not None, f"{key} is logged but not in rft/metrics_schema.py"


def test_reward_returns_exactly_its_declared_keys():
    out = reward_func_em.reward_func(["<|channel|>final<|message|>\\boxed{7}<|return|>"], [""], ["7"])
    assert set(out["extra_logs"]) == set(reward_func_em.EXTRA_LOG_KEYS) | set(contract.TEXT_LOG_KEYS)
    codes = {float(c) for c in contract.PARSE_METHOD_CODES.values()}
    assert float(out["extra_logs"]["parse_method"]) in codes


def test_consumers_use_the_contracts_objects():
    """The readers hold the very objects of rft.contract, not copies."""
    from rft import run_health
    from rft.openrlhf import rollout_stats, run_log

    assert run_health.METRICS_FILE is contract.METRICS_FILE
    assert rollout_stats.SHARE_KEYS is contract.SHARE_KEYS
    assert run_log.PARSE_METHOD_NAMES is contract.PARSE_METHOD_NAMES
