"""check_run.py on bad input: NaN, damaged lines, unreadable files, moved run files, marks.

Every case here once slipped through as HEALTHY, a traceback or a silent "no spikes". The
expected lines, steps and exit codes are written out by hand from the files each test builds.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import synthetic_runs
from rft import run_health

REPO = Path(__file__).resolve().parents[1]


def _write(directory: Path, lines: list[bytes | str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    (directory / "training_metrics.jsonl").write_bytes(data)
    return directory


def _healthy_lines() -> list[str]:
    return [json.dumps(r) for r in synthetic_runs.records("healthy")[0]]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "check_run.py"), *args, "--no-png"], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def _levels(run: run_health.Run, th: run_health.Thresholds | None = None) -> dict[str, run_health.Verdict]:
    return {v.check: v for v in run_health.evaluate_run(run, th)}


# ------------------------------------------------------------------------- NaN and inf


def test_nan_from_step_25_on_is_a_stop_naming_the_steps(tmp_path):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, "diverged"))
    verdicts = _levels(run, run_health.Thresholds(save_steps=10))
    nonfinite = verdicts["non-finite values"]
    assert nonfinite.level == "stop"
    assert "6 step(s) 25-30" in nonfinite.detail and "entropy_mean, grad_norm, policy_loss" in nonfinite.detail
    # save_steps 10: the last save before step 25 is step 20
    assert "global_step20" in nonfinite.action and nonfinite.checkpoint == 20
    # the checks of the broken keys judged step 24's values and said ok before
    assert verdicts["grad_norm"].level == "n/a" and verdicts["entropy"].level == "n/a"
    assert run_health.exit_code(list(verdicts.values())) == 2


def test_nan_and_infinity_literals_stop_too(tmp_path):
    lines = _healthy_lines()
    lines[9] = lines[9].replace('"grad_norm": ', '"grad_norm": NaN, "x": ', 1)  # step 10
    lines[10] = lines[10].replace('"policy_loss": ', '"policy_loss": -Infinity, "y": ', 1)  # step 11
    run = run_health.load_run(_write(tmp_path, lines))
    verdict = _levels(run)["non-finite values"]
    assert verdict.level == "stop" and "2 step(s) 10-11: grad_norm, policy_loss" in verdict.detail, verdict
    assert "--save-steps" in verdict.action  # no checkpoint is named without the save interval


def test_a_nonfinite_eval_key_listed_alone_stops(tmp_path):
    rows = synthetic_runs.records("healthy")[0]
    rows[4]["nonfinite_keys"] = ["eval/probe_ood/reward_mean"]  # step 5
    run = run_health.load_run(_write(tmp_path, [json.dumps(r) for r in rows]))
    assert _levels(run)["non-finite values"].detail == "NaN or inf at 1 step(s) 5: eval/probe_ood/reward_mean"


def test_format_steps():
    assert run_health.format_steps([9, 3, 4, 5, 12, 13]) == "3-5, 9, 12-13"
    assert run_health.format_steps([7]) == "7"


# ---------------------------------------------------------------------------- bad lines


def test_text_values_and_steps_without_global_step_are_named_by_line(tmp_path):
    lines = _healthy_lines()
    row6 = json.loads(lines[5])
    del row6["global_step"]
    lines[5] = json.dumps(row6)  # line 6
    lines[7] = lines[7].replace('"reward_mean": ', '"reward_mean": "0.5", "z": ', 1)  # line 8
    lines[11] = json.dumps([1, 2])  # line 12
    lines[12] = lines[12].replace('"run_id": "synthetic"', '"run_id": 7', 1)  # line 13
    run = run_health.load_run(_write(tmp_path, lines))
    files = _levels(run)["metrics files"]
    assert files.level == "warn" and files.action
    assert "training_metrics.jsonl line 6: no global_step" in files.detail
    assert 'training_metrics.jsonl line 8: reward_mean is text ("0.5"), not a number' in files.detail
    assert "training_metrics.jsonl line 12: a JSON list, not an object" in files.detail
    assert "4 bad:" in files.detail and "training_metrics.jsonl line 13: run_id is a number, not text" in files.detail
    assert 8 in [r["global_step"] for r in run.records]  # its other values still count
    assert 6 not in [r["global_step"] for r in run.records]
    proc = _cli(str(tmp_path))
    assert proc.returncode == 1 and "verdict: WARNINGS" in proc.stdout, proc.stdout + proc.stderr


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    lines: list[bytes | str] = list(_healthy_lines())
    lines[2] = b'{"global_step": 3, "run_id": "\xff\xfe"}'  # line 3; 0xff is its 31st byte
    proc = _cli(str(_write(tmp_path, lines)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "training_metrics.jsonl line 3: not UTF-8 (byte 0xff at column 31)" in proc.stdout


def test_a_torn_last_line_is_a_run_being_written_a_torn_middle_line_is_not(tmp_path):
    lines = _healthy_lines()
    path = _write(tmp_path, lines) / "training_metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"global_step": 31, "rew')
    assert _levels(run_health.load_run(tmp_path))["metrics files"].level == "ok"
    path.write_bytes(path.read_bytes() + b'ard_mean": 0.5, "run_id": "caf\xc3')  # cut inside a two-byte character
    assert _levels(run_health.load_run(tmp_path))["metrics files"].level == "ok"
    path.write_text("\n".join(lines[:4] + ['{"global_step": 5, "rew'] + lines[5:]) + "\n")
    files = _levels(run_health.load_run(tmp_path))["metrics files"]
    assert files.level == "warn" and "training_metrics.jsonl line 5: not JSON" in files.detail


# ------------------------------------------------------------------------ unreadable input


def test_a_folder_where_the_metrics_file_should_be_is_one_line_exit_3(tmp_path):
    (tmp_path / "training_metrics.jsonl").mkdir()
    proc = _cli(str(tmp_path))
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "is a folder, not a file" in proc.stderr
    assert str(tmp_path / "training_metrics.jsonl") in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreadable_metrics_file_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    from check_run import main

    _write(tmp_path, _healthy_lines())
    target = tmp_path / "training_metrics.jsonl"
    real = pathlib.Path.read_bytes

    def denied(self):
        if self == target:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)  # tests may run as root, who reads anything
    assert main([str(tmp_path), "--no-png"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == f"check_run.py: {target}: cannot read (Permission denied); check its permissions or copy it somewhere readable"


def test_the_metrics_file_itself_may_be_passed(tmp_path):
    synthetic_runs.write_run(tmp_path, "grad_spike")
    proc = _cli(str(tmp_path / "training_metrics.jsonl"))
    assert proc.returncode == 1 and "WARN  grad_norm" in proc.stdout, proc.stdout + proc.stderr  # the spike log beside it


def test_only_damaged_lines_is_exit_3_naming_the_first(tmp_path):
    proc = _cli(str(_write(tmp_path, ['{"step": 1}'])))
    assert proc.returncode == 3 and "training_metrics.jsonl line 1: no global_step" in proc.stderr


# ------------------------------------------------------------------ paths from the manifest


def _manifest(directory: Path, **fields) -> None:
    (directory / "run_manifest.json").write_text(json.dumps({"schema": 1, **fields}))


def test_a_moved_spike_log_is_read_from_the_manifest(tmp_path):
    run_dir = synthetic_runs.write_run(tmp_path / "metrics", "grad_spike")
    moved = tmp_path / "elsewhere" / "spikes.jsonl"
    moved.parent.mkdir()
    (run_dir / "spike_log.jsonl").rename(moved)
    rows = [r for r in synthetic_runs.records("grad_spike")[0]]
    for r in rows:  # no grad-norm peak in the records: only the spike log shows the spike
        r.update(grad_norm=0.3, grad_norm_max=0.5)
    (run_dir / "training_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _levels(run_health.load_run(run_dir))["grad_norm"].level == "ok"  # without a manifest: no spikes
    _manifest(run_dir, env={"METRICS_LOG_DIR": str(run_dir), "SPIKE_LOG_PATH": str(moved), "SAMPLES_LOG_DIR": None})
    run = run_health.load_run(run_dir)
    grad = _levels(run)["grad_norm"]
    assert grad.level == "warn" and "[17]" in grad.detail and str(moved) in grad.action


def test_a_paths_object_wins_and_a_copied_folder_keeps_its_spike_log(tmp_path):
    run_dir = synthetic_runs.write_run(tmp_path / "copy", "grad_spike")
    (run_dir / "spike_log.jsonl").rename(run_dir / "spikes.jsonl")
    samples = tmp_path / "samples"
    samples.mkdir()
    for step in (12, 24):
        (samples / f"samples_step{step}.jsonl").write_text("{}\n")
    # recorded on the node under /node/metrics; read here from the copy
    _manifest(
        run_dir,
        env={"METRICS_LOG_DIR": "/node/metrics", "SPIKE_LOG_PATH": "/node/metrics/wrong.jsonl"},
        paths={"metrics_dir": "/node/metrics", "spike_log": "/node/metrics/spikes.jsonl", "samples_dir": str(samples)},
        command=["python3", "-m", "openrlhf.cli.train_ppo_ray", "--save_steps", "6"],
    )
    run = run_health.load_run(run_dir)
    assert run.paths.spike_log == run_dir / "spikes.jsonl" and run.paths.samples_dir == samples
    assert [s["global_step"] for s in run.spikes] == [17]
    assert run.paths.save_steps == 6
    # checkpoints: multiples of 6 among steps 1..30, and the steps with a samples file
    assert run_health.checkpoint_steps(run, run.paths.save_steps) == [6, 12, 18, 24, 30]
    assert run_health.checkpoint_steps(run, None) == [12, 24]


def test_the_manifests_save_steps_names_the_checkpoint(tmp_path):
    run_dir = synthetic_runs.write_run(tmp_path, "eval_divergence")
    _manifest(run_dir, command=["python3", "-m", "openrlhf.cli.train_ppo_ray", "--save_steps=10"])
    proc = _cli(str(run_dir))
    assert proc.returncode == 2 and "keep checkpoint global_step20" in proc.stdout, proc.stdout
    proc = _cli(str(run_dir), "--save-steps", "5")  # the command line wins
    assert "keep checkpoint global_step15" in proc.stdout, proc.stdout


def test_the_launchers_run_logs_and_parsed_arguments_are_read(tmp_path):
    """The launcher's manifest: run_logs holds the paths, openrlhf_args the parsed --save_steps."""
    run_dir = synthetic_runs.write_run(tmp_path / "metrics", "grad_spike")
    moved = tmp_path / "spikes.jsonl"
    (run_dir / "spike_log.jsonl").rename(moved)
    _manifest(
        run_dir,
        env={"SPIKE_LOG_PATH": str(run_dir / "spike_log.jsonl")},  # run_logs wins over env
        run_logs={"METRICS_LOG_DIR": str(run_dir), "SAMPLES_LOG_DIR": None, "SPIKE_LOG_PATH": str(moved)},
        openrlhf_args={"save_steps": 4},
        command=["python3", "-m", "openrlhf.cli.train_ppo_ray", "--save_steps", "9"],
    )
    run = run_health.load_run(run_dir)
    assert run.paths.spike_log == moved and [s["global_step"] for s in run.spikes] == [17]
    assert run.paths.save_steps == 4


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_an_unreadable_manifest_is_a_warning_not_silence(tmp_path, text):
    run_dir = synthetic_runs.write_run(tmp_path, "healthy")
    (run_dir / "run_manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    files = _levels(run_health.load_run(run_dir))["metrics files"]
    assert files.level == "warn" and "run_manifest.json" in files.detail and "default paths" in files.detail


def test_a_damaged_spike_log_is_named(tmp_path):
    run_dir = synthetic_runs.write_run(tmp_path, "grad_spike")
    with open(run_dir / "spike_log.jsonl", "ab") as f:
        f.write(b'{"grad_norm": 80.0}\n{"global_step": 20, "grad_norm": 90.0}\n')
    run = run_health.load_run(run_dir)
    assert "spike_log.jsonl line 2: no global_step" in _levels(run)["metrics files"].detail
    assert sorted(s["global_step"] for s in run.spikes) == [17, 20]


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_marks_checkpoints_the_kept_one_failures_and_nan(tmp_path):
    rows = synthetic_runs.records("diverged")[0]
    rows[6]["reward_failures_count"] = 2.0  # step 7
    rows[7]["reward_failures_count"] = 1.0  # step 8
    run = run_health.load_run(_write(tmp_path, [json.dumps(r) for r in rows]))
    th = run_health.Thresholds(save_steps=10)
    verdicts = run_health.evaluate_run(run, th)
    marks = run_health.dashboard_marks(run, verdicts, th)
    assert marks.checkpoints == [10, 20, 30] and marks.recommended == 20
    assert marks.reward_failures == [7, 8] and marks.nonfinite == [25, 26, 27, 28, 29, 30]
    assert marks.eval_steps == [5, 10, 15, 20, 25, 30]
    fig = run_health.draw_dashboard(run, verdicts, th)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == [
        "eval step",
        "checkpoint (3)",
        "keep global_step20",
        "reward failures (steps 7-8)",
        "NaN/inf (steps 25-30)",
    ]
    assert all(t.get_fontsize() >= 10 for legend in fig.legends for t in legend.get_texts())
    reward = fig.axes[0]
    curves = [line for line in reward.get_lines() if line.get_label() in ("reward_mean", "correctness", "pass_at_1")]
    assert len(curves) == 3  # the three coincide in this run: each needs its own look
    assert len({(c.get_linestyle(), c.get_marker()) for c in curves}) == 3
    assert all(t.get_fontsize() >= 10 for t in reward.get_legend().get_texts())
    out = run_health.write_dashboard(run, tmp_path / "d.png", verdicts, th)
    assert out.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".d.png.*"))
