"""check_run.py and rft.run_health on synthetic runs (tests/fixtures/synthetic_runs.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import synthetic_runs
from rft import metrics_schema, run_health

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    # kind: (exit code, {check: level}) - every check not listed must be ok or n/a
    "healthy": (0, {}),
    "mode_collapse": (2, {"entropy": "stop", "frac_reward_zero_std": "stop"}),
    "grad_spike": (1, {"grad_norm": "warn"}),
    "runaway_truncation": (2, {"truncation": "stop"}),
    "eval_divergence": (2, {"held-out eval": "stop"}),
    "diverged": (2, {"non-finite values": "stop"}),  # grad_norm and entropy must not say ok
    "off_policy": (2, {"generation KL": "stop", "served update": "warn"}),
    "gen_kl_drift": (1, {"generation KL": "warn"}),  # one spike above 0.02 is not sustained
}


@pytest.mark.parametrize("kind", synthetic_runs.KINDS)
def test_verdicts_on_synthetic_runs(kind, tmp_path):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, kind))
    verdicts = run_health.evaluate_run(run)
    code, flagged = EXPECTED[kind]
    levels = {v.check: v.level for v in verdicts}
    for check, level in flagged.items():
        assert levels[check] == level, (check, verdicts)
    others = {c: lv for c, lv in levels.items() if c not in flagged}
    assert set(others.values()) <= {"ok", "n/a"}, others
    assert run_health.exit_code(verdicts) == code
    for v in verdicts:
        if v.level in ("warn", "stop"):
            assert v.action  # every warning says what to do


def test_eval_divergence_names_the_best_checkpoint(tmp_path):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, "eval_divergence"))
    verdict = run_health.check_eval(run, run_health.Thresholds())
    assert "0.350 -> 0.330 -> 0.310" in verdict.detail
    # evals 0.30 0.34 0.36 0.35 0.33 0.31 at steps 5..30; without --save-steps no checkpoint is named
    assert "step 15" in verdict.action and "global_step" not in verdict.action and "--save-steps" in verdict.action


@pytest.mark.parametrize(
    ("save_steps", "fragment"),
    [
        (5, "keep checkpoint global_step15 (best"),  # the best eval step has a checkpoint
        (15, "keep checkpoint global_step15 (best"),
        (10, "keep checkpoint global_step20 (eval/probe_ood/greedy_pass@1 0.350"),  # best with a checkpoint
        (7, "global_step14"),  # no eval step holds a checkpoint: the last one before the best eval
        (40, "no checkpoint at or before step 15"),
        (-1, "the run saves no checkpoints"),
    ],
)
def test_early_stop_names_a_checkpoint_that_exists(tmp_path, save_steps, fragment):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, "eval_divergence"))
    verdict = run_health.check_eval(run, run_health.Thresholds(save_steps=save_steps))
    assert verdict.level == "stop" and fragment in verdict.action, verdict.action
    named = [int(x) for x in re.findall(r"global_step(\d+)", verdict.action)]
    assert save_steps > 0 or not named
    assert all(step % save_steps == 0 for step in named)  # only steps where OpenRLHF saved


def test_cli_passes_save_steps(tmp_path, capsys):
    from check_run import main

    run_dir = synthetic_runs.write_run(tmp_path, "eval_divergence")
    assert main([str(run_dir), "--no-png", "--save-steps", "10"]) == 2
    assert "keep checkpoint global_step20" in capsys.readouterr().out


def test_one_fall_is_not_divergence(tmp_path):
    rows, _ = synthetic_runs.records("eval_divergence")
    run = run_health.Run(rows[:25])  # evals 0.30 0.34 0.36 0.35 0.33: falls at 20 and 25
    assert run_health.check_eval(run, run_health.Thresholds()).level == "stop"
    run = run_health.Run(rows[:20])  # one fall only
    assert run_health.check_eval(run, run_health.Thresholds()).level == "ok"


def test_smoke_table_failures(tmp_path):
    rows, _ = synthetic_runs.records("healthy")
    th = run_health.Thresholds()
    zero = [dict(r, reward_mean=0.0, grad_norm=0.0, advantage_std=0.0) for r in rows[:4]]
    run = run_health.Run(zero)
    assert run_health.check_reward(run, th).level == "stop"
    assert run_health.check_grad_norm(run, th).level == "stop"
    assert run_health.check_advantage_std(run, th).level == "stop"
    solved = run_health.Run([dict(r, reward_mean=1.0) for r in rows[:4]])
    assert run_health.check_reward(solved, th).level == "warn"
    clip = run_health.Run([dict(r, ppo_clip_ratio=0.55) for r in rows[:4]])
    assert run_health.check_clip_ratio(clip, th).level == "warn"
    boxed = run_health.Run([dict(r, has_boxed=0.9 - 0.05 * i) for i, r in enumerate(rows[:8])])
    assert run_health.check_has_boxed(boxed, th).level == "warn"
    short = run_health.Run([dict(r, response_length=2000.0 if i < 3 else 700.0) for i, r in enumerate(rows[:8])])
    assert run_health.check_length(short, th).level == "warn"
    hacked = run_health.Run([dict(r, high_reward_but_wrong=0.2) for r in rows[:4]])
    assert run_health.check_reward_hacking(hacked, th).level == "warn"
    assert run_health.check_reward_hacking(run_health.Run(rows[:4]), th).level == "n/a"


def test_last_line_of_a_step_wins_and_torn_lines_are_skipped(tmp_path):
    rows, _ = synthetic_runs.records("healthy")
    path = tmp_path / "training_metrics.jsonl"
    lines = [json.dumps(r) for r in rows[:5]] + [json.dumps(dict(rows[3], reward_mean=0.99)), '{"global_st']
    path.write_text("\n".join(lines))
    run = run_health.load_run(tmp_path)
    assert [r["global_step"] for r in run.records] == [1, 2, 3, 4, 5]
    assert run.records[3]["reward_mean"] == 0.99 and run.bad_lines == 1


def test_spikes_of_steps_a_resumed_run_rewrote_are_not_reported(tmp_path):
    """A run resumed from step 10 rewrote steps 11..: the old run's spike at 17 is not this run's."""
    rows, spikes = synthetic_runs.records("grad_spike")
    for row in rows:
        row["run_id"] = "first" if row["global_step"] <= 10 else "resumed"
    old_spike = dict(spikes[0], run_id="first")  # step 17 of the first run, before the crash
    new_spike = dict(spikes[0], global_step=12, run_id="resumed")
    pending = dict(spikes[0], global_step=31, run_id="resumed")  # step in progress: no record yet
    unlabelled = dict(spikes[0], global_step=5)
    unlabelled.pop("run_id")
    (tmp_path / "training_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "spike_log.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in (old_spike, new_spike, pending, unlabelled))
    )
    run = run_health.load_run(tmp_path)
    assert sorted(s["global_step"] for s in run.spikes) == [5, 12, 31]


def test_generation_kl_verdicts_name_the_numbers_and_the_limits():
    th = run_health.Thresholds()
    off = run_health.Run(synthetic_runs.records("off_policy")[0])
    verdict = run_health.check_gen_kl(off, th)
    assert verdict.level == "stop" and "> 0.02 on the last 5 steps" in verdict.detail
    assert "worst sequence 0.45 at step 10" in verdict.detail and "RFT_LORA_SYNC=native" in verdict.action
    drift = run_health.Run(synthetic_runs.records("gen_kl_drift")[0])
    verdict = run_health.check_gen_kl(drift, th)
    assert verdict.level == "warn" and "0.004 at step 30" in verdict.detail and "worst sequence 1.4 at step 15" in verdict.detail
    # the spike alone, followed by healthy steps, leaves the run ok
    assert run_health.check_gen_kl(run_health.Run(drift.records[:20]), th).level == "ok"
    assert run_health.check_gen_kl(run_health.Run([{"global_step": 1}]), th).level == "n/a"


@pytest.mark.parametrize(
    ("delta", "target", "logged", "level", "share"),
    [
        (0.998, 1.0, None, "ok", 0.998),
        (1 / 6, 1.0, None, "warn", 1 / 6),  # the merged sync lost most of a small update
        (1.5, 1.0, None, "warn", 1.5),  # rounding moved more than the update: not the update either
        (0.0, 0.0, None, "ok", 1.0),  # nothing intended, nothing lost
        (0.2, 1.0, 1.0, "ok", 1.0),  # a value the trainer wrote wins over the derived one
        (None, None, None, "n/a", None),
    ],
)
def test_served_share_from_the_sync_norms(delta, target, logged, level, share):
    rows = []
    for step in range(1, 5):
        row = {"global_step": step}
        if delta is not None:
            row.update(sync_delta_norm=delta, sync_target_norm=target)
        if logged is not None:
            row["sync_served_share"] = logged
        rows.append(row)
    run = run_health.Run(rows)
    assert run_health.check_served_share(run, run_health.Thresholds()).level == level
    assert [v for _, v in run.served_share()] == ([] if share is None else [pytest.approx(share)] * 4)


def test_dashboard_draws_the_generation_kl_with_its_limits(tmp_path):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, "off_policy"))
    fig = run_health.draw_dashboard(run, run_health.evaluate_run(run))
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("engine vs trainer"))
    labels = [line.get_label() for line in panel.get_lines()]
    assert {"gen_kl", "gen_kl_seq_p99", "gen_kl_seq_max", "warn 0.002", "stop 0.02 (sustained)"} <= set(labels)
    assert panel.get_yscale() == "log"
    curve = next(line for line in panel.get_lines() if line.get_label() == "gen_kl")
    assert list(curve.get_xdata()) == list(range(1, 31))
    assert any(ax.get_title().startswith("held-out eval") and ax.get_visible() for ax in fig.axes)


def test_the_health_report_needs_no_torch():
    """check_run.py runs where the run's files were copied, often without torch: the drift limits
    it reads (rft.policy_drift) are the same objects the trainer's gen_kl module names."""
    code = "import sys, rft.run_health; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    from rft import policy_drift
    from rft.openrlhf import gen_kl

    assert gen_kl.GEN_KL_WARN is policy_drift.GEN_KL_WARN and gen_kl.gen_kl_verdict is policy_drift.gen_kl_verdict
    assert run_health.GEN_KL_STOP is policy_drift.GEN_KL_STOP


def test_synthetic_records_follow_the_schema():
    for kind in synthetic_runs.KINDS:
        for row in synthetic_runs.records(kind)[0]:
            assert metrics_schema.unknown_keys(row) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["healthy", "grad_spike", "eval_divergence"])
def test_cli_exit_code_report_and_png(kind, tmp_path):
    run_dir = synthetic_runs.write_run(tmp_path / kind, kind)
    proc = subprocess.run(
        [sys.executable, str(REPO / "check_run.py"), str(run_dir)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == EXPECTED[kind][0], proc.stdout + proc.stderr
    assert "verdict:" in proc.stdout
    png = run_dir / "run_health.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_png_in_process(tmp_path):
    run = run_health.load_run(synthetic_runs.write_run(tmp_path, "mode_collapse"))
    out = run_health.write_dashboard(run, tmp_path / "d.png", run_health.evaluate_run(run))
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_exits_3(tmp_path):
    from check_run import main

    assert main([str(tmp_path / "missing"), "--no-png"]) == 3
    (tmp_path / "training_metrics.jsonl").write_text("")
    assert main([str(tmp_path), "--no-png"]) == 3
    with pytest.raises(SystemExit) as e:
        main(["--window"])
    assert e.value.code == 3


def test_help():
    proc = subprocess.run([sys.executable, str(REPO / "check_run.py"), "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--follow" in proc.stdout and "exit code" in proc.stdout.lower()


@pytest.mark.slow
def test_follow_reports_again_when_the_run_grows(tmp_path):
    import threading

    rows, _ = synthetic_runs.records("runaway_truncation")
    path = tmp_path / "training_metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "check_run.py"), str(tmp_path), "--follow", "--interval", "0.3", "--no-png"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_for(text: str, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while text not in "".join(lines) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert text in "".join(lines), "".join(lines)

    try:
        wait_for("verdict: HEALTHY")
        tmp = tmp_path / "grown.jsonl"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)  # the run grew by 22 steps
        wait_for("verdict: STOP")
        assert "STOP  truncation" in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 2, "".join(lines)

def test_docs_table_is_the_schema():
    docs = (REPO / "docs" / "metrics.md").read_text()
    assert docs.endswith(metrics_schema.render_markdown())


def test_schema_check_cli(tmp_path):
    path = synthetic_runs.write_run(tmp_path, "healthy") / "training_metrics.jsonl"
    assert metrics_schema.main(["--check", str(path)]) == 0
    with open(path, "a") as f:
        f.write(json.dumps({"global_step": 31, "pass1": 0.5}) + "\n")
    assert metrics_schema.main(["--check", str(path)]) == 1
