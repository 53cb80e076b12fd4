"""tests/gpu/run_gpu_lane.sh refuses a machine that cannot run the lane, in one line (runs on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "gpu" / "run_gpu_lane.sh"


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT_DIR": str(tmp_path / "out"), "STACK_DIR": str(tmp_path / "stack"),
                "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=300)


def test_no_gpu_is_a_one_line_refusal(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the lane would run")
    proc = _run(tmp_path, PYTHON=sys.executable)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"run_gpu_lane.sh: no CUDA GPU visible to {sys.executable}; the GPU lane needs one "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
    ]
    assert not (tmp_path / "out" / "step_metrics.jsonl").exists()


@pytest.mark.parametrize(
    "setup, fragment",
    [
        ("missing", "is not a folder of wheels"),
        ("empty", "must hold exactly one openrlhf-*.whl (found 0)"),
    ],
)
def test_bad_wheel_folder_is_refused_before_installing(tmp_path, setup, fragment):
    wheels = tmp_path / "wheels"
    if setup == "empty":
        wheels.mkdir()
    proc = _run(tmp_path, PYTHON=sys.executable, WHEELS=str(wheels))
    assert proc.returncode == 2
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "stack").exists()


def test_missing_interpreter_is_named(tmp_path):
    proc = _run(tmp_path, PYTHON="/nonexistent/python3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "run_gpu_lane.sh: /nonexistent/python3 not found; set PYTHON=/path/to/python"


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_help_is_the_usage_and_checks_nothing(tmp_path, option):
    """No interpreter, GPU or wheel is looked at: a missing PYTHON and WHEELS do not matter."""
    full_env = {**os.environ, "PYTHON": "/nonexistent/python3", "WHEELS": str(tmp_path / "none"),
                "STACK_DIR": str(tmp_path / "stack"), "OUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(SCRIPT), option], capture_output=True, text=True, env=full_env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("rft's GPU lane:") and "WHEELS" in proc.stdout and "set -euo" not in proc.stdout
    assert os.listdir(tmp_path) == []
