"""The test bed itself: pristine manifest, tree isolation, and the vLLM import boundary."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import oprl

RUN_SH = oprl.REPO / "tests" / "run.sh"


def _manifest() -> list[tuple[str, str]]:
    rows = []
    for line in (oprl.PATCHES / "MANIFEST.sha256").read_text().splitlines():
        digest, path = line.split(maxsplit=1)
        rows.append((digest, path.strip()))
    return rows


def test_manifest_matches_installed_pristine_openrlhf():
    rows = _manifest()
    assert len(rows) >= 9
    for digest, rel in rows:
        assert hashlib.sha256((oprl.SITE / rel).read_bytes()).hexdigest() == digest, rel


def test_installed_openrlhf_is_0_9_3():
    from importlib.metadata import version

    assert version("openrlhf") == "0.9.3"


def test_load_imports_from_the_requested_tree(pristine_root, tmp_path):
    other = oprl.pristine_copy(tmp_path / "other")
    marker = other / "openrlhf" / "models" / "loss.py"
    marker.write_text(marker.read_text() + "\nRFT_TREE_MARKER = 'other'\n")
    a = oprl.load(pristine_root, "openrlhf.models.loss")
    assert not hasattr(a, "RFT_TREE_MARKER")
    assert Path(a.__file__).resolve().is_relative_to(pristine_root.resolve())
    b = oprl.load(other, "openrlhf.models.loss")
    assert b.RFT_TREE_MARKER == "other"
    assert Path(b.__file__).resolve().is_relative_to(other.resolve())


def test_patched_tree_differs_from_pristine_only_in_manifest_files(pristine_root, patched_root):
    targets = {rel for _, rel in _manifest()}
    for path in (pristine_root / "openrlhf").rglob("*.py"):
        rel = path.relative_to(pristine_root).as_posix()
        patched = patched_root / rel
        if rel not in targets:
            assert patched.read_bytes() == path.read_bytes(), f"{rel} changed but is not in the manifest"


def test_series_lists_existing_patches_in_order():
    names = oprl.series_names()
    assert len(names) == len(set(names)), "a patch is listed twice"
    for name in names:
        assert (oprl.PATCHES / name).is_file(), f"patches/series names a missing file: {name}"


def test_vllm_boundary_stub_lets_real_modules_import(vllm_stub, pristine_root):
    em = oprl.load(pristine_root, "openrlhf.trainer.ppo_utils.experience_maker")
    engine = oprl.load(pristine_root, "openrlhf.trainer.ray.vllm_engine")
    assert em.SamplingParams is vllm_stub.SamplingParams
    params = em.SamplingParams(temperature=0.6, n=1)
    assert params.temperature == 0.6 and params.n == 1
    assert engine.TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    with pytest.raises(RuntimeError, match="cannot start"):
        engine.vllm.AsyncEngineArgs(model="x")


def test_flash_attn_loads_without_cuda_kernels(pristine_root):
    actor = oprl.load(pristine_root, "openrlhf.models.actor")
    assert hasattr(actor, "Actor")
    from flash_attn.bert_padding import pad_input, unpad_input  # pure torch, real code
    import torch

    x = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 1]])
    unpadded, indices, *_ = unpad_input(x, mask)
    assert unpadded.shape == (3, 3)
    assert torch.equal(pad_input(unpadded, indices, 1, 4)[0, 2], torch.zeros(3))


# ---------------------------------------------------------------- tests/run.sh keeps openrlhf pristine

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for the venv's python: records each call; runs heredoc scripts ('-') with the real
# Python on the fake site; 'pip install' copies the pristine package back when PRISTINE is set;
# 'pytest' exits with FAKE_PYTEST_RC.
echo "$*" >>"$LOG"
case "$1 $2" in
  "- "*) PYTHONPATH="$FAKE_SITE" exec "$REAL_PYTHON" "$@" ;;
  "-m pip") if [[ -n "$PRISTINE" ]]; then rm -rf "$FAKE_SITE/openrlhf" && cp -r "$PRISTINE/openrlhf" "$FAKE_SITE/"; fi ;;
  "-m pytest") exit "${FAKE_PYTEST_RC:-0}" ;;
esac
exit 0
"""


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python is FAKE_PYTHON, with a stamp that says the install is current."""
    venv, site = tmp_path / "venv", tmp_path / "site"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    oprl.pristine_copy(site)
    for dist_info in oprl.SITE.glob("openrlhf-*.dist-info"):
        shutil.copytree(dist_info, site / dist_info.name)
    stamp = subprocess.run(
        ["bash", "-c", "{ cat \"$1\"; sed -n '/^install_env()/,/^}/p' \"$2\"; } | sha256sum | cut -d' ' -f1",
         "_", str(oprl.REPO / "tests" / "requirements-cpu.txt"), str(RUN_SH)],
        capture_output=True, text=True, check=True,
    ).stdout
    (venv / ".rft-install-stamp").write_text(stamp)
    return venv, site


def run_testbed(venv: Path, site: Path, tmp_path: Path, pristine: Path | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {"PATH": os.environ["PATH"], "RFT_VENV": str(venv), "LOG": str(log), "FAKE_SITE": str(site),
           "REAL_PYTHON": sys.executable, "PRISTINE": str(pristine or "")}
    proc = subprocess.run(["bash", str(RUN_SH), "-k", "nothing"], capture_output=True, text=True, env=env)
    return proc, log.read_text().splitlines()


def test_run_sh_goes_straight_to_pytest_on_a_pristine_install(tmp_path):
    venv, site = fake_venv(tmp_path)
    proc, calls = run_testbed(venv, site, tmp_path, pristine=None)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["- 0.9.3", "-m pytest -k nothing"]


def test_run_sh_reinstalls_an_openrlhf_patched_in_place(tmp_path, pristine_root):
    venv, site = fake_venv(tmp_path)
    loss = site / "openrlhf" / "models" / "loss.py"
    loss.write_text(loss.read_text() + "# patched in place\n")
    proc, calls = run_testbed(venv, site, tmp_path, pristine=pristine_root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"tests/run.sh: openrlhf/models/loss.py differs from the openrlhf 0.9.3 wheel; "
        f"reinstalling the pristine openrlhf==0.9.3 into {venv}"
    ]
    assert calls[1].startswith("-m pip install") and calls[1].endswith("--no-deps --force-reinstall openrlhf==0.9.3")
    assert calls[-1] == "-m pytest -k nothing" and calls.count("- 0.9.3") == 2
    assert loss.read_bytes() == (pristine_root / "openrlhf" / "models" / "loss.py").read_bytes()


def test_run_sh_stops_when_the_reinstall_does_not_help(tmp_path):
    venv, site = fake_venv(tmp_path)
    (site / "openrlhf" / "models" / "loss.py").unlink()
    proc, calls = run_testbed(venv, site, tmp_path, pristine=None)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tests/run.sh: openrlhf/models/loss.py is missing from the installed openrlhf after reinstalling; "
        f"remove {venv} and run again"
    )
    assert not any("pytest" in c for c in calls)


@pytest.mark.parametrize(("pytest_rc", "ci_rc"), [(0, 0), (1, 1), (5, 1), (2, 2)])
def test_ci_run_calls_run_sh_and_fails_when_no_test_ran(tmp_path, pytest_rc, ci_rc):
    """.ci/run is the README's test command; pytest's 5 (no tests collected) is a failure there."""
    venv, site = fake_venv(tmp_path)
    log = tmp_path / "calls.log"
    env = {"PATH": os.environ["PATH"], "RFT_VENV": str(venv), "LOG": str(log), "FAKE_SITE": str(site),
           "REAL_PYTHON": sys.executable, "PRISTINE": "", "FAKE_PYTEST_RC": str(pytest_rc)}
    proc = subprocess.run(["bash", str(oprl.REPO / ".ci" / "run")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == ci_rc, proc.stderr
    assert log.read_text().splitlines() == ["- 0.9.3", "-m pytest"]
    assert ("no tests" in proc.stderr) == (pytest_rc == 5)
