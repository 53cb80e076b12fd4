"""eval_posthoc.py on bad input and after a kill: one line naming the file, nothing left behind.

The datasets here are written by the tests, and the expected line numbers, counts and
messages are spelled out by hand. No model is loaded: every refusal comes before one.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import eval_posthoc
from rft.eval_io import EvalInputError, SampleStore, load_problems, safe_name

ROOT = Path(__file__).resolve().parents[1]
HOST = safe_name(socket.gethostname())


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """eval_posthoc.py with a model that is never loaded (every case stops or only summarizes)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "eval_posthoc.py"), "--model", "m=/no/such/model", "--output-dir", str(tmp_path / "out"),
         "--bootstrap-resamples", "10", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("eval_posthoc.py: error: ") and "Traceback" not in proc.stderr
    return lines[0]


def _rows(*labels: object) -> str:
    return "".join(json.dumps({"input": f"problem {i}", "label": lab}) + "\n" for i, lab in enumerate(labels))


# ----------------------------------------------------------------------------- datasets


def test_a_folder_given_as_the_dataset_is_named_as_a_folder(tmp_path):
    (tmp_path / "data").mkdir()
    line = _one_line(_cli(tmp_path, "--dataset", str(tmp_path / "data")))
    assert f"{tmp_path / 'data'}: is a folder, not a dataset file; pass the file itself to --dataset" in line


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_rows("1").encode() + b'{"input": "caf\xe9", "label": "2"}\n')
    line = _one_line(_cli(tmp_path, "--dataset", str(data)))
    # line 2, and 0xe9 is byte 15 of it: {"input": "caf is 14 bytes
    assert f"{data}:2: not UTF-8 (byte 0xe9 at column 15); re-save the file as UTF-8" in line


def test_an_unreadable_dataset_is_one_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(_rows("1"))
    real = pathlib.Path.read_bytes

    def denied(self):
        if self == data:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)  # tests may run as root, who reads anything
    assert eval_posthoc.main(["--model", "m=/x", "--dataset", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"eval_posthoc.py: error: {data}: cannot read (Permission denied); check its permissions or pass another --dataset"


def test_any_other_unreadable_file_is_one_line_too(monkeypatch, capsys):
    def run(argv):
        raise PermissionError(13, "Permission denied", "/ckpt/adapter_model.safetensors")

    monkeypatch.setattr(eval_posthoc, "run", run)
    assert eval_posthoc.main([]) == 2
    assert capsys.readouterr().err == (
        "eval_posthoc.py: error: /ckpt/adapter_model.safetensors: Permission denied; check that path and its permissions\n"
    )


@pytest.mark.parametrize("label", ["", "   "])
def test_an_empty_label_is_refused_with_its_line(tmp_path, label):
    data = tmp_path / "d.jsonl"
    data.write_text(_rows("1", "2", label))
    with pytest.raises(EvalInputError) as e:
        load_problems(data)
    assert str(e.value) == f"{data}:3: empty 'label'; every row needs its answer (or remove the row)"


def test_non_integer_labels_are_one_warning_with_count_and_first_line(tmp_path):
    data = tmp_path / "d.jsonl"
    # the reward reads 90^\circ and x = 5 as integers; \frac{1}{2} and 3.5 are not
    data.write_text(_rows("5", "\\frac{1}{2}", "90^\\circ", "3.5", "x = 5"))
    proc = _cli(tmp_path, "--dataset", str(data), "--summary-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"eval_posthoc.py: warning: {data}: 2 of 5 labels are not integers (first at line 2: '\\\\frac{{1}}{{2}}'); "
        "the reward grades integer answers, so these compare as text"
    ]
    data.write_text(_rows("5", 7, "033"))
    assert "warning" not in _cli(tmp_path, "--dataset", str(data), "--summary-only").stderr


def test_problems_keep_their_line_numbers(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n" + _rows("1") + "\n\n" + _rows("2"))
    assert [(p.index, p.line) for p in load_problems(data)] == [(0, 2), (1, 5)]


def test_a_damaged_samples_file_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"problem": 0, "sample": 0, "run_key": "k"}\n{"problem": 1, "sample": 0, "x": "\xff"}\n')
    with pytest.raises(EvalInputError, match=rf"{path}:2: damaged record \(not UTF-8\)"):
        SampleStore(path, "k").load()
    path.write_text('{"problem": 0, "sample": 0, "run_key": "k"}\n["not", "a", "record"]\n')
    with pytest.raises(EvalInputError, match=rf"{path}:2: not a sample record"):
        SampleStore(path, "k").load()


# ------------------------------------------------------------------------- killed merges


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_merge_folders_of_dead_processes_are_removed(tmp_path, capsys):
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f".a.merging-{dead}@{HOST}": False,  # this host, process gone: removed
        f".b.merging-{dead}": False,  # the name older versions wrote (no host): removed
        f".c.old-{dead}@{HOST}": False,  # the old model set aside during a replace: removed
        f".d.merging-{alive}@{HOST}": True,  # a merge still running: kept
        f".e.merging-{dead}@another-host": True,  # shared storage, another node's merge: kept
        "f": True,  # a finished merge
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 64)
    removed = eval_posthoc.clean_stale_merges(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
    assert capsys.readouterr().out.count("left by an interrupted merge") == 3


@pytest.mark.slow
def test_a_merge_killed_with_sigkill_is_cleaned_by_the_next_run(tmp_path, monkeypatch):
    """SIGKILL a merge while it saves; the next merge into the same --merged-dir removes the leftover.

    The merge runs for real up to the save; only the model is a stand-in whose save writes a
    shard and then hangs, so the kill lands while the temporary folder holds a partial model.
    """
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    script = textwrap.dedent(
        f"""
        import os, time, eval_posthoc, peft
        class Model:
            def merge_and_unload(self):
                return self
            def save_pretrained(self, path, safe_serialization=True):
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, "model-00001.safetensors"), "wb") as f:
                    f.write(bytes(64))
                time.sleep(600)
        eval_posthoc._load_base_for_merge = lambda base, dtype, device_map: Model()
        peft.PeftModel.from_pretrained = lambda model, path: model
        eval_posthoc.merge_adapter("a", {str(adapter)!r}, "base-model", {str(merged)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = merged / f".a.merging-{proc.pid}@{HOST}" / "model-00001.safetensors"
    deadline = time.time() + 180
    try:
        while not shard.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert shard.exists()  # the kill left a partial model behind

    def broken_base(base, dtype, device_map):
        raise OSError("no such model")

    monkeypatch.setattr(eval_posthoc, "_load_base_for_merge", broken_base)
    with pytest.raises(EvalInputError, match="cannot load the base model"):
        eval_posthoc.merge_adapter("a", adapter, "base-model", merged)
    assert list(merged.iterdir()) == []  # the leftover is gone, and the failed merge left nothing


def test_a_run_that_needs_no_merge_still_cleans_the_leftovers(tmp_path):
    merged = tmp_path / "merged"
    leftover = merged / f".a.merging-{_dead_pid()}@{HOST}"
    leftover.mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(_rows("1"))
    proc = _cli(tmp_path, "--adapter", f"a={adapter}", "--base", "base-model", "--merged-dir", str(merged),
                "--dataset", str(data), "--summary-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not leftover.exists() and f"[merge] removed {leftover}" in proc.stdout
