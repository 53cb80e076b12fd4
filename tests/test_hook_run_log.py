"""rft.openrlhf.run_log: the run-log writer and the trainer's hooks, without OpenRLHF.

A full disk is stood in for by :class:`TinyDisk`, which replaces ``os.write`` for the files of
one directory only: it writes as many bytes as are "free", returns a short count when the data
does not fit, and raises ENOSPC when nothing is free, as write(2) does on a full file system.
Everything else (open, ftruncate, rename, the JSON) is the real thing on ``tmp_path``.
"""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest
import torch

from rft import metrics_schema
from rft.contract import TEXT_LOG_KEYS
from rft.openrlhf import run_log
from rft.openrlhf.run_log import RECORDS_LOST_KEY, RunLogWriter, TrainerRunLog


class Warnings:
    """Collects the hook module's warnings and errors."""

    def __init__(self, monkeypatch):
        self.messages: list[str] = []
        monkeypatch.setattr(run_log.logger, "warning", lambda msg, *a, **k: self.messages.append(str(msg)))
        monkeypatch.setattr(run_log.logger, "error", lambda msg, *a, **k: self.messages.append(str(msg)))


class TinyDisk:
    """``os.write`` for the files under ``root`` as on a disk with ``free`` bytes left; others untouched."""

    def __init__(self, monkeypatch, root, free: int):
        self.root, self.free, self.calls = str(root), free, 0
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self.root + os.sep):
            return self._write(fd, data)
        self.calls += 1
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self._write(fd, bytes(data[: self.free]))
        self.free -= written
        return written


def records(path) -> list[dict]:
    """Every line of a JSONL file parsed (a torn line fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def step(n: int, **values) -> dict:
    return {"global_step": n, "timestamp": 0.0, "reward_mean": 0.5, **values}


# ------------------------------------------------------------------------------ writer


def test_unwritable_targets_warn_once_each_and_training_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    warnings = Warnings(monkeypatch)
    metrics_dir, samples_dir = blocker / "metrics", blocker / "samples"
    writer = RunLogWriter(metrics_dir=str(metrics_dir), samples_dir=str(samples_dir))
    for n in (1, 2, 3):
        assert writer.write_step(step(n)) is False
        assert writer.write_samples(n, [{"prompt": "p"}]) is False
        assert writer.write_spikes(n, [{"grad_norm": 99.0, "prompt_hashes": []}], {}) == 0

    def about(folder):  # the warnings naming a file in ``folder`` (whatever words the temporary path holds)
        return [m for m in warnings.messages if f"cannot write {folder}{os.sep}" in m]

    # metrics, samples and the spike log (beside the metrics) each warn once, not once a step
    assert len(about(metrics_dir)) == 2 and len(about(samples_dir)) == 1 and len(warnings.messages) == 3
    assert all("training goes on" in m and "every later step tries again" in m for m in warnings.messages)
    assert writer.health["metrics"].lost == 3 and writer.health["samples"].lost == 3


def test_unset_directories_warn_once(monkeypatch):
    warnings = Warnings(monkeypatch)
    writer = RunLogWriter.from_env({})
    writer.write_step(step(1))
    writer.write_samples(1, [{"a": 1}])
    assert sorted(m.split(" is not set")[0].split(": ")[1] for m in warnings.messages) == [
        "METRICS_LOG_DIR",
        "SAMPLES_LOG_DIR",
    ]


def test_lines_are_whole_json_and_readable_at_once(tmp_path):
    writer = RunLogWriter(metrics_dir=str(tmp_path))
    writer.write_step(step(1, grad_norm=0.5))
    # readable while the writer is alive: nothing is buffered
    line = (tmp_path / "training_metrics.jsonl").read_text()
    assert json.loads(line)["grad_norm"] == 0.5 and line.endswith("\n")
    assert json.loads(line)["run_id"] == writer.run_id
    assert "step=1" in (tmp_path / "learning.log").read_text()


def test_resume_does_not_duplicate_steps(tmp_path):
    first = RunLogWriter(metrics_dir=str(tmp_path))
    for n in range(1, 6):
        first.write_step(step(n, reward_mean=0.1 * n))
    with open(tmp_path / "training_metrics.jsonl", "a") as f:
        f.write('{"global_step": 6, "rew')  # the crash left half a line
    # the run resumes from the checkpoint of step 3: its next step is 4
    second = RunLogWriter(metrics_dir=str(tmp_path))
    second.write_step(step(4, reward_mean=0.9))
    lines = records(tmp_path / "training_metrics.jsonl")
    assert [x["global_step"] for x in lines] == [1, 2, 3, 4]
    assert lines[-1]["run_id"] == second.run_id != lines[0]["run_id"]
    assert lines[-1]["reward_mean"] == 0.9
    superseded = (tmp_path / "training_metrics.superseded.jsonl").read_text().splitlines()
    assert len(superseded) == 3  # steps 4 and 5 of the first run, and the torn line
    log_steps = [line.split("step=")[1].split()[0] for line in (tmp_path / "learning.log").read_text().splitlines()]
    assert log_steps == ["1", "2", "3", "4"]


def test_a_full_disk_never_leaves_a_torn_line_and_writing_resumes(tmp_path, monkeypatch):
    """Disk fills in the middle of step 3's line; steps 3-5 are lost, step 6 lands and says so."""
    warnings = Warnings(monkeypatch)
    writer = RunLogWriter(metrics_dir=str(tmp_path))
    writer.write_step(step(1))
    writer.write_step(step(2))
    metrics = tmp_path / "training_metrics.jsonl"
    before = metrics.read_bytes()
    disk = TinyDisk(monkeypatch, tmp_path, free=40)  # less than one record: a short write
    for n in (3, 4, 5):
        assert writer.write_step(step(n)) is False
        assert metrics.read_bytes() == before  # the 40 bytes of step 3 were truncated away
    assert disk.calls == 3  # every step tried again
    failing = [m for m in warnings.messages if "cannot write" in m]
    assert len(failing) == 1 and str(metrics) in failing[0] and "step records are being lost" in failing[0]
    disk.free = 10**6  # space returns
    assert writer.write_step(step(6)) is True
    lines = records(metrics)
    assert [x["global_step"] for x in lines] == [1, 2, 6]
    assert lines[-1][RECORDS_LOST_KEY] == 3 and RECORDS_LOST_KEY not in lines[0]
    resumed = [m for m in warnings.messages if "again" in m and "cannot" not in m]
    assert len(resumed) == 1 and "3 step records were lost" in resumed[0]
    writer.write_step(step(7))
    assert RECORDS_LOST_KEY not in records(metrics)[-1]  # reported once
    assert metrics_schema.unknown_keys(lines[-1]) == []  # the schema defines the new key
    log_steps = [line.split("step=")[1].split()[0] for line in (tmp_path / "learning.log").read_text().splitlines()]
    assert log_steps == ["1", "2", "6", "7"]


def test_enospc_on_the_first_byte_also_leaves_the_file_whole(tmp_path, monkeypatch):
    writer = RunLogWriter(metrics_dir=str(tmp_path))
    writer.write_step(step(1))
    TinyDisk(monkeypatch, tmp_path, free=0)
    assert writer.write_step(step(2)) is False
    assert [x["global_step"] for x in records(tmp_path / "training_metrics.jsonl")] == [1]


def test_a_full_disk_leaves_no_samples_temp_file_and_each_log_warns(tmp_path, monkeypatch):
    """Samples and metrics in the same full directory: each says so, no samples_stepN.jsonl.tmp.PID stays."""
    warnings = Warnings(monkeypatch)
    writer = RunLogWriter(metrics_dir=str(tmp_path), samples_dir=str(tmp_path))
    disk = TinyDisk(monkeypatch, tmp_path, free=10)
    rows = [{"prompt": "p" * 100, "response": "r"}]
    assert writer.write_samples(1, rows) is False
    assert writer.write_step(step(1)) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_metrics.jsonl"]  # created empty, never torn
    assert (tmp_path / "training_metrics.jsonl").read_bytes() == b""
    assert len([m for m in warnings.messages if "sample files are being lost" in m]) == 1
    assert len([m for m in warnings.messages if "step records are being lost" in m]) == 1
    disk.free = 10**6
    assert writer.write_samples(2, rows) is True
    assert records(tmp_path / "samples_step2.jsonl") == rows
    assert [p.name for p in tmp_path.iterdir() if ".tmp." in p.name] == []


def test_nonfinite_values_become_null_and_are_listed():
    values, nonfinite = run_log.numeric_metrics({"a": float("nan"), "b": 1, "c": True, "d": "text", "e": [1]})
    assert values == {"a": None, "b": 1.0, "c": 1.0} and nonfinite == ["a"]
    record = run_log.step_record(3, {"x": float("inf")}, {"probe/greedy_pass@1": float("nan")}, 0, 0.5)
    assert record["nonfinite_keys"] == ["x", "eval/probe/greedy_pass@1"]
    json.dumps(record, allow_nan=False)  # writable as strict JSON


def test_learning_log_line_names_each_value():
    record = {"timestamp": 0.0, "global_step": 7, "policy_loss": -0.5, "reward_mean": 0.25, "reward_std": 0.5}
    record["eval/aime/greedy_pass@1"] = 0.125
    line = run_log.learning_log_line(record)
    assert line.startswith("1970-01-01T00:00:00Z step=7 loss=-0.5000 grad=n/a ")
    assert "reward=0.250\u00b10.500" in line and line.endswith("eval/aime/greedy_pass@1=0.125")


def test_env_paths_become_absolute_and_a_bad_number_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"METRICS_LOG_DIR": "rel/m", "SPIKE_GRAD_NORM": "lots", "OTHER": "x", "SAMPLES_LOG_DIR": " "}
    assert run_log.run_log_env(env) == {"METRICS_LOG_DIR": str(tmp_path / "rel/m"), "SPIKE_GRAD_NORM": "lots"}
    warnings = Warnings(monkeypatch)
    assert RunLogWriter.from_env(env).spike_grad_norm == 50.0
    assert any("SPIKE_GRAD_NORM='lots' is not a number" in m for m in warnings.messages)


# ------------------------------------------------------------------------------ samples and text logs


class TextTokenizer:
    """Decodes each token id to a fixed piece of text."""

    PIECES = {1: "Q: ", 2: "what? ", 3: "so it is ", 4: "\\boxed{42}", 5: "no idea", 6: "."}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[int(t)] for t in ids)


def text_experience(responses, answers):
    """A micro-batch whose rows are prompt [1, 2] then a response, with the reward's text log."""
    width = max(len(r) for r in responses)
    sequences = torch.zeros(len(responses), 2 + width, dtype=torch.long)
    action_mask = torch.zeros(len(responses), 1 + width, dtype=torch.bool)
    for i, response in enumerate(responses):
        sequences[i, :2] = torch.tensor([1, 2])
        sequences[i, 2 : 2 + len(response)] = torch.tensor(response)
        action_mask[i, 1 : 1 + len(response)] = True  # action_mask[j] marks sequences[j + 1]
    return SimpleNamespace(
        sequences=sequences,
        action_mask=action_mask,
        prompts=["Q: what? "] * len(responses),
        labels=["42"] * len(responses),
        info={
            "reward": torch.tensor([1.0, 0.0]),
            "parse_method": torch.tensor([2.0, 0.0]),
            "extracted_answer": list(answers),
        },
    )


def test_text_logs_leave_the_info_and_reach_the_sample_rows():
    experience = text_experience([[3, 4, 6], [5, 6]], ["42", None])
    text_logs = run_log.pop_text_logs([experience])
    assert text_logs == [{"extracted_answer": ["42", None]}]
    assert not set(TEXT_LOG_KEYS) & set(experience.info)  # nothing text-valued is left to average
    rows = run_log.sample_rows([experience], TextTokenizer(), 5, 16, text_logs)
    assert [r["response"] for r in rows] == ["so it is \\boxed{42}.", "no idea."]
    assert [r["extracted_answer"] for r in rows] == ["42", None]
    assert [r["parse_method"] for r in rows] == ["boxed", "none"]
    assert [r["reward"] for r in rows] == [1.0, 0.0] and rows[1]["sample"] == 1
    # without text logs (a reward that gives none) the field is absent, not guessed
    assert "extracted_answer" not in run_log.sample_rows([experience], TextTokenizer(), 5, 16)[0]
    assert len(run_log.sample_rows([experience], TextTokenizer(), 5, 1, text_logs)) == 1


# ------------------------------------------------------------------------------ the trainer's hooks


def test_a_step_through_the_hooks(tmp_path, monkeypatch):
    """The calls train_step, fit and save_logs_and_checkpoints make, in their order."""
    writer = RunLogWriter(metrics_dir=str(tmp_path / "m"), samples_dir=str(tmp_path / "s"), spike_grad_norm=10.0)
    hooks = TrainerRunLog(writer)
    experience = text_experience([[3, 4, 6], [5, 6]], ["42", None])
    hooks.generation_started()
    hooks.start_step()
    hooks.rollout_made([experience], 2, 2, TextTokenizer())
    assert "extracted_answer" not in experience.info
    assert records(tmp_path / "s" / "samples_step2.jsonl")[0]["extracted_answer"] == "42"
    hooks.lap()
    status = {"policy_loss": 0.1, "parse_method": 1.5, "reward": 0.4}
    status["optimizer_step_details"] = [{"grad_norm": 3.0, "prompt_hashes": []}, {"grad_norm": 12.0, "prompt_hashes": []}]
    hooks.lap("training_seconds")
    hooks.sync_done([{"sync_seconds": 0.25, "note": "text", "ok": True}, {"sync_seconds": 9.0}])
    hooks.lap("weight_sync_seconds")
    maker = SimpleNamespace(batch_metrics={"reward_mean": 0.5, "pass_at_1": 0.5})
    hooks.finish_step(status, maker)
    assert "optimizer_step_details" not in status and "parse_method" not in status
    assert status["reward_mean"] == 0.5 and status["sync_seconds"] == 0.25 and "ok" not in status
    for phase in ("generation_seconds", "experience_seconds", "training_seconds", "weight_sync_seconds"):
        assert status[phase] >= 0.0
    spikes = records(tmp_path / "m" / "spike_log.jsonl")
    assert len(spikes) == 1 and spikes[0]["grad_norm"] == 12.0 and spikes[0]["optimizer_step_in_rollout"] == 1
    hooks.run_eval(lambda step, **kw: {"probe/greedy_pass@1": 0.75, "n": kw["n_samples_per_prompt"]}, 2, {"n_samples_per_prompt": 1})
    hooks.lap()
    hooks.write_step(2, {**status, "generated_samples": ["text", 1.0]}, {"episode": 0})
    record = records(tmp_path / "m" / "training_metrics.jsonl")[0]
    assert record["eval/probe/greedy_pass@1"] == 0.75 and record["eval/seconds"] >= 0.0 and record["episode"] == 0
    assert "generated_samples" not in record and metrics_schema.unknown_keys(record) == ["eval/n"]
    hooks.write_step(3, {}, None)  # the eval belongs to its own step only
    assert not [k for k in records(tmp_path / "m" / "training_metrics.jsonl")[1] if k.startswith("eval/")]


def test_a_failed_eval_or_record_costs_only_itself(tmp_path, monkeypatch):
    warnings = Warnings(monkeypatch)
    hooks = TrainerRunLog(RunLogWriter(metrics_dir=str(tmp_path)))

    def broken_eval(step, **kw):
        raise RuntimeError("engine gone")

    hooks.run_eval(broken_eval, 4, {})
    assert hooks.eval_logs == {} and any("eval at step 4 failed" in m for m in warnings.messages)
    hooks.write_step(4, {"x": object()}, {"episode": 0})  # non-numbers are left out, not fatal
    assert records(tmp_path / "training_metrics.jsonl")[0]["global_step"] == 4
    hooks.finish_step({}, None)  # no batch metrics, no details: nothing to add, nothing raised


def test_samples_only_on_save_steps(tmp_path):
    hooks = TrainerRunLog(RunLogWriter(metrics_dir=str(tmp_path), samples_dir=str(tmp_path)))
    for n, save_steps in ((1, 2), (3, float("inf")), (4, -1)):
        experience = text_experience([[3, 4, 6], [5, 6]], ["42", None])
        hooks.rollout_made([experience], n, save_steps, TextTokenizer())
        assert "extracted_answer" not in experience.info  # taken out on every step
    assert not list(tmp_path.glob("samples_step*"))


def test_sync_metrics_carry_the_served_share():
    """The record says which share of the intended update the engines serve: 0.6 / 0.8 = 0.75."""
    from rft.openrlhf.run_log import sync_metrics

    out = sync_metrics([{"sync_delta_norm": 0.6, "sync_target_norm": 0.8, "sync_seconds": 1}])
    assert out["sync_served_share"] == pytest.approx(0.75)
    assert "sync_served_share" not in sync_metrics([{"sync_seconds": 1.0}])
