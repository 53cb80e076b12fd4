"""Run-health checks and dashboard for a GRPO run's metrics directory.

Reads ``training_metrics.jsonl`` (one JSON object per global step, keys defined in
:mod:`rft.metrics_schema`) and the spike log, applies the checks of the early smoke-test
table and tuning playbook, and draws the main curves. ``check_run.py`` is the command-line
front end.

Where the spike log and the samples are comes from the run's ``run_manifest.json`` when it
is there (the launcher records the paths it handed to the trainer), so a run that moved its
spike log is not read as a run without spikes. Nothing bad in the input is skipped quietly:
a damaged line, a step record without ``global_step``, a value that is not a number and a
NaN or infinity each reach the verdict with their line or step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.contract import (
    ENV_METRICS_DIR,
    ENV_SAMPLES_DIR,
    ENV_SPIKE_PATH,
    METRICS_FILE,
    RUN_MANIFEST,
    SAMPLES_GLOB,
    SPIKE_FILE,
)
from rft.contract import ENV_LORA_SYNC, MANIFEST_ARGS, MANIFEST_RUN_LOGS
from rft.policy_drift import GEN_KL_STOP, GEN_KL_SUSTAINED, GEN_KL_WARN, SERVED_SHARE_WARN, gen_kl_verdict, served_share

__all__ = ["METRICS_FILE", "SPIKE_FILE", "RunPaths", "Run", "load_run", "evaluate_run", "write_dashboard"]

OK, WARN, STOP, NA = "ok", "warn", "stop", "n/a"
EXIT_HEALTHY, EXIT_WARN, EXIT_STOP, EXIT_UNREADABLE = 0, 1, 2, 3
_RANK = {NA: 0, OK: 0, WARN: 1, STOP: 2}

TEXT_KEYS = {"run_id": str, "nonfinite_keys": list}
"""Keys of a step record whose value is not a number (every other key holds a number)."""
NULLABLE_KEYS = frozenset({"episode"})
"""Keys the trainer may write as null without a NaN behind it (no episode in the client state)."""
_JSON_TYPE = {str: "text", list: "a list", dict: "an object", bool: "true/false"}
PROBLEMS_SHOWN = 4
"""Bad lines named in the report's one-line detail; the rest are counted."""


@dataclass
class RunPaths:
    """The files of one run: where each came from is said in the report."""

    metrics_dir: Path
    metrics_file: Path
    spike_log: Path
    samples_dir: Path | None = None
    save_steps: int | None = None  # the run's --save_steps, read from the manifest's command
    source: str = "default paths"  # or the manifest the paths came from


@dataclass
class Run:
    """The step records of a run, one per global step (the last line of a step wins).

    ``problems`` holds one line per damaged or malformed input line (file and line number),
    ``lines`` the line number of each kept step record, and ``bad_lines`` counts every line
    skipped, a torn last line included (a run being written ends with one).
    """

    records: list[dict]
    spikes: list[dict] = field(default_factory=list)
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    lines: dict[int, int] = field(default_factory=dict)
    paths: RunPaths | None = None
    torn_tail: bool = False

    def series(self, key: str) -> list[tuple[int, float]]:
        """(global_step, value) of every record that has a finite ``key``."""
        out = []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(r["global_step"]), float(v)))
        return out

    def served_share(self) -> list[tuple[int, float]]:
        """(global_step, sync_served_share) of every record: the logged value, else derived from
        ``sync_delta_norm`` / ``sync_target_norm`` of the same record (finite values only)."""
        out = []
        for r in self.records:
            value = r.get("sync_served_share")
            if not _number(value):
                delta, target = r.get("sync_delta_norm"), r.get("sync_target_norm")
                if not (_number(delta) and _number(target) and math.isfinite(delta) and math.isfinite(target)):
                    continue
                try:
                    value = served_share(float(delta), float(target))
                except ValueError:
                    continue
            if math.isfinite(value):
                out.append((int(r["global_step"]), float(value)))
        return out

    def eval_keys(self) -> list[str]:
        """Held-out pass@1 keys (``eval/{dataset}/{mode}_pass@1``) present in the run."""
        return sorted({k for r in self.records for k in r if k.startswith("eval/") and k.endswith("_pass@1")})


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Thresholds:
    """Limits of the checks; defaults follow the early smoke-test table and tuning playbook."""

    window: int = 3
    max_norm: float = 1.0
    grad_factor: float = 100.0
    truncation_warn: float = 0.5
    truncation_stop: float = 0.8
    clip_warn: float = 0.4
    zero_std_warn: float = 0.5
    zero_std_stop: float = 0.8
    has_boxed_min: float = 0.5
    has_boxed_drop: float = 0.2
    entropy_warn: float = 0.5
    entropy_stop: float = 0.2
    length_drop: float = 0.5
    hacking_warn: float = 0.05
    save_steps: int | None = None  # the run's --save_steps: which steps have a checkpoint


@dataclass
class Verdict:
    """Outcome of one check; ``checkpoint`` is the step of the checkpoint its action names."""

    check: str
    level: str
    detail: str
    action: str = ""
    checkpoint: int | None = None


# ------------------------------------------------------------------------------ reading


def read_lines(path: Path) -> tuple[list[tuple[int, bytes]], bool]:
    """Non-blank lines of a file with their 1-based numbers, and whether the last is unterminated.

    Raises ValueError naming the file when it cannot be read (a folder, no permission).
    """
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a file; pass the run's METRICS_LOG_DIR (the folder holding {METRICS_FILE})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e}); check its permissions or copy it somewhere readable") from None
    return [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()], not data.endswith(b"\n")


def parse_line(line: bytes) -> tuple[object, str | None]:
    """(JSON value, None), or (None, why the line is not JSON text)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at column {e.colno})"


def step_problem(row: object) -> str | None:
    """Why a line cannot be placed at a step: not an object, or no integer ``global_step``."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    step = row.get("global_step")
    if "global_step" not in row:
        return "no global_step"
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not float(step).is_integer():
        return f"global_step {json.dumps(step)[:20]} is not a step number"
    return None


def record_problems(row: dict) -> list[str]:
    """What is wrong with the values of a step record; empty when they follow the schema's types.

    Values are numbers or null (NaN written by the trainer), except ``run_id`` (text) and
    ``nonfinite_keys`` (a list). A value of another type would be skipped by every check,
    so it is reported.
    """
    out = []
    for key, value in row.items():
        if key == "global_step" or value is None:
            continue
        if key in TEXT_KEYS:
            if not isinstance(value, TEXT_KEYS[key]):
                out.append(f"{key} is {_JSON_TYPE.get(type(value), 'a number')}, not {_JSON_TYPE[TEXT_KEYS[key]]}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"{key} is {_JSON_TYPE.get(type(value), 'a value')} ({json.dumps(value)[:20]}), not a number")
    return out


def read_records(path: Path, label: str, check_values: bool = True) -> tuple[list[tuple[int, dict]], list[str], int, bool]:
    """(line number, record) of every usable line, problems, lines skipped, torn last line.

    The last line of a file still being written may be cut short: that one is skipped
    without a problem. Every other line that cannot be used is a problem naming ``label``
    and its line number. A record with a problem but a step number is kept (its good values
    still count); one without a step number cannot be placed and is skipped. With
    ``check_values`` off (the spike log, whose records hold lists and texts) only the step
    number is checked.
    """
    lines, unterminated = read_lines(path)
    rows, problems, skipped, torn = [], [], 0, False
    for i, (n, line) in enumerate(lines):
        row, why = parse_line(line)
        if why is not None:
            skipped += 1
            if i == len(lines) - 1 and unterminated:  # cut mid-line, perhaps mid-character
                torn = True
            else:
                problems.append(f"{label} line {n}: {why}")
            continue
        unplaced = step_problem(row)
        bad = ([unplaced] if unplaced else []) + (record_problems(row) if check_values and isinstance(row, dict) else [])
        if bad:
            problems.append(f"{label} line {n}: " + "; ".join(bad))
        if unplaced:
            skipped += 1
        else:
            rows.append((n, row))
    return rows, problems, skipped, torn


# ----------------------------------------------------------------------------- manifest


def _text(obj: object, key: str) -> str | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def flag_value(command: object, flag: str) -> str | None:
    """The value argparse would give ``flag`` in a recorded command (its last occurrence)."""
    if not isinstance(command, list):
        return None
    value = None
    for i, arg in enumerate(command):
        if not isinstance(arg, str):
            continue
        if arg == flag and i + 1 < len(command) and isinstance(command[i + 1], str):
            value = command[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def relocate(recorded: str, recorded_dir: str | None, metrics_dir: Path) -> Path:
    """A recorded path; one inside the recorded metrics folder follows the folder's copy.

    Metrics folders are copied off the node to be read: a spike log the manifest places in
    the run's metrics folder is read from the folder given here, not from the node's path.
    """
    path = Path(recorded)
    if recorded_dir:
        try:
            return metrics_dir / path.relative_to(Path(recorded_dir))
        except ValueError:
            pass
    return path


def run_paths(metrics_dir: Path, metrics_file: Path | None = None) -> tuple[RunPaths, list[str]]:
    """The run's files, from ``run_manifest.json`` when it is there; problems with the manifest.

    Accepts the launcher's layouts (``run_logs`` or ``env`` hold METRICS_LOG_DIR,
    SAMPLES_LOG_DIR and SPIKE_LOG_PATH; ``openrlhf_args`` the parsed trainer arguments,
    ``command`` the raw ones) and a ``paths`` object with ``metrics_dir``, ``spike_log`` and
    ``samples_dir``; the first of paths, run_logs and env that names a path wins.
    A missing manifest means the defaults; an unreadable one is a problem, as the defaults
    may then name the wrong spike log.
    """
    metrics_dir = Path(metrics_dir)
    paths = RunPaths(metrics_dir, metrics_file or metrics_dir / METRICS_FILE, metrics_dir / SPIKE_FILE)
    manifest_path = metrics_dir / RUN_MANIFEST
    if not manifest_path.exists():
        return paths, []
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = getattr(e, "strerror", None) or getattr(e, "msg", None) or type(e).__name__
        return paths, [f"{RUN_MANIFEST}: unreadable ({why}); spike log and samples read from the default paths"]
    if not isinstance(manifest, dict):
        return paths, [f"{RUN_MANIFEST}: not a JSON object; spike log and samples read from the default paths"]
    named, logs, env = manifest.get("paths"), manifest.get(MANIFEST_RUN_LOGS), manifest.get("env")
    recorded_dir = _text(named, "metrics_dir") or _text(logs, ENV_METRICS_DIR) or _text(env, ENV_METRICS_DIR)
    spike = _text(named, "spike_log") or _text(logs, ENV_SPIKE_PATH) or _text(env, ENV_SPIKE_PATH)
    samples = _text(named, "samples_dir") or _text(logs, ENV_SAMPLES_DIR) or _text(env, ENV_SAMPLES_DIR)
    if spike:
        paths.spike_log = relocate(spike, recorded_dir, metrics_dir)
    if samples:
        paths.samples_dir = relocate(samples, recorded_dir, metrics_dir)
    parsed = manifest.get(MANIFEST_ARGS)
    save_steps = parsed.get("save_steps") if isinstance(parsed, dict) else None
    if save_steps is None:
        save_steps = flag_value(manifest.get("command"), "--save_steps")
    if isinstance(save_steps, str) and re.fullmatch(r"-?\d+", save_steps.strip()):
        save_steps = int(save_steps)
    if isinstance(save_steps, int) and not isinstance(save_steps, bool):
        paths.save_steps = save_steps
    paths.source = str(manifest_path)
    return paths, []


def resolve_metrics(path: Path) -> tuple[Path, Path]:
    """(metrics folder, metrics file) of what the user passed: the folder or the file itself."""
    path = Path(path)
    if path.is_dir():
        return path, path / METRICS_FILE
    if path.exists():
        return path.parent, path
    raise ValueError(f"{path}: not found; pass the run's METRICS_LOG_DIR (the folder holding {METRICS_FILE})")


def load_run(metrics_dir: Path) -> Run:
    """Load a run from its metrics folder (or file); ValueError, naming the file, when unreadable."""
    folder, metrics_file = resolve_metrics(metrics_dir)
    if not metrics_file.exists():
        raise ValueError(f"{metrics_file}: not found; pass the run's METRICS_LOG_DIR (the folder holding {METRICS_FILE})")
    paths, problems = run_paths(folder, metrics_file)
    rows, bad, skipped, torn = read_records(metrics_file, metrics_file.name)
    problems += bad
    by_step: dict[int, dict] = {}
    lines: dict[int, int] = {}
    for n, row in rows:
        step = int(row["global_step"])
        by_step[step], lines[step] = row, n
    spikes = []
    if paths.spike_log.exists():
        label = paths.spike_log.name if paths.spike_log.parent == folder else str(paths.spike_log)
        try:
            spike_rows, spike_problems, _, _ = read_records(paths.spike_log, label, check_values=False)
        except ValueError as e:
            spike_rows, spike_problems = [], [str(e)]
        spikes = [row for _, row in spike_rows]
        problems += spike_problems
    return Run(
        [by_step[s] for s in sorted(by_step)], current_spikes(spikes, by_step), skipped, problems, lines, paths, torn
    )


def current_spikes(spikes: list[dict], by_step: dict[int, dict]) -> list[dict]:
    """Spike records of the steps the run kept.

    A run resumed from a checkpoint rewrites the steps after it, and the trainer moves their old
    step records aside, but spike_log.jsonl keeps the old run's lines: drop a spike whose step
    has a kept record written by another run (``run_id``). Spikes without a run id, or of a step
    with no record yet (the step in progress), stay.
    """
    kept = []
    for spike in spikes:
        try:
            record = by_step.get(int(spike.get("global_step")))
        except (TypeError, ValueError):
            record = None
        spike_run, record_run = spike.get("run_id"), (record or {}).get("run_id")
        if spike_run is not None and record_run is not None and spike_run != record_run:
            continue
        kept.append(spike)
    return kept


def format_steps(steps: list[int]) -> str:
    """Steps as ranges: [3, 4, 5, 9] -> "3-5, 9"."""
    out: list[str] = []
    for step in sorted(set(steps)):
        if out and step == last + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{step}"
        else:
            out.append(str(step))
        last = step
    return ", ".join(out)


def nonfinite_steps(run: Run) -> dict[int, list[str]]:
    """Keys that were NaN or infinite, per step.

    The trainer writes such a value as null and lists its key in ``nonfinite_keys``; a
    writer that put a NaN or Infinity literal in the line counts too. Every check reads only
    finite values, so without this a run that diverged would look like its last good step.
    """
    out: dict[int, list[str]] = {}
    for r in run.records:
        listed = r.get("nonfinite_keys")
        keys = {str(k) for k in listed} if isinstance(listed, list) else set()
        for key, value in r.items():
            if key in TEXT_KEYS or key in NULLABLE_KEYS:
                continue
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                keys.add(key)
        if keys:
            out[int(r["global_step"])] = sorted(keys)
    return out


def last_save_before(step: int, save_steps: int | None) -> int | None:
    """The last step before ``step`` that OpenRLHF saved (``N % save_steps == 0``), if known."""
    if not save_steps or save_steps <= 0:
        return None
    before = (step - 1) // save_steps * save_steps
    return before if before > 0 else None


def checkpoint_steps(run: Run, save_steps: int | None) -> list[int]:
    """Steps that have a checkpoint: multiples of --save_steps, and steps with a samples file.

    The trainer writes ``samples_stepN.jsonl`` on exactly the steps it saves, so the samples
    folder shows them even without --save-steps.
    """
    steps = {int(r["global_step"]) for r in run.records}
    saved = {s for s in steps if save_steps and save_steps > 0 and s % save_steps == 0}
    samples_dir = run.paths.samples_dir if run.paths else None
    if samples_dir is not None:
        try:
            names = [p.name for p in samples_dir.glob(SAMPLES_GLOB)]
        except OSError:
            names = []
        saved |= {int(m.group(1)) for m in map(re.compile(r"samples_step(\d+)\.jsonl").fullmatch, names) if m}
    return sorted(saved)


def reward_failure_steps(run: Run) -> list[int]:
    """Steps at which the reward function failed on at least one sample."""
    s = run.series("reward_failures_count") or run.series("reward_failures")
    return [step for step, v in s if v > 0]


def _named_checkpoint(action: str) -> int | None:
    m = re.search(r"global_step(\d+)", action)
    return int(m.group(1)) if m else None


def _samples_hint(run: Run) -> str:
    samples_dir = run.paths.samples_dir if run.paths else None
    return f"{samples_dir}/{SAMPLES_GLOB}" if samples_dir else SAMPLES_GLOB


def check_files(run: Run, th: Thresholds) -> Verdict:
    """Lines of the metrics file or spike log that no check can read, by file and line."""
    if not run.problems:
        return Verdict("metrics files", OK, "every line read" + ("; the last is being written" if run.torn_tail else ""))
    shown = "; ".join(run.problems[:PROBLEMS_SHOWN])
    more = f" (+{len(run.problems) - PROBLEMS_SHOWN} more)" if len(run.problems) > PROBLEMS_SHOWN else ""
    return Verdict(
        "metrics files",
        WARN,
        f"{len(run.problems)} bad: {shown}{more}",
        "every check leaves these lines out: repair or remove them, and read the trainer log at those steps "
        "(a full disk tears lines; a text value or a record without global_step means the writer is broken)",
    )


def check_nonfinite(run: Run, th: Thresholds) -> Verdict:
    """NaN or infinity in any key is a stop: the run diverged, or a metric broke."""
    bad = nonfinite_steps(run)
    if not bad:
        return Verdict("non-finite values", OK, "none")
    steps = sorted(bad)
    keys = sorted({k for ks in bad.values() for k in ks})
    first = steps[0]
    named = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
    detail = f"NaN or inf at {len(steps)} step(s) {format_steps(steps)}: {named}"
    action = f"training diverged or a metric overflowed at step {first}: stop the run and read the trainer log at that step"
    keep = last_save_before(first, th.save_steps)
    if th.save_steps is None:
        action += "; pass --save-steps to name the checkpoint to resume from"
    elif th.save_steps <= 0:
        action += "; the run saves no checkpoints: restart with a lower lr"
    elif keep is None:
        action += f"; no checkpoint before step {first}: restart with a lower lr"
    else:
        action += f"; resume from checkpoint global_step{keep}, the last save before it, with a lower lr"
    return Verdict("non-finite values", STOP, detail, action, keep)


def _tail(series: list[tuple[int, float]], n: int) -> list[float]:
    return [v for _, v in series[-n:]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check_reward(run: Run, th: Thresholds) -> Verdict:
    s = run.series("reward_mean") or run.series("reward")
    if len(s) < th.window:
        return Verdict("reward", NA, f"{len(s)} steps; needs {th.window}")
    last = _tail(s, th.window)
    if all(v <= 0.0 for v in last):
        return Verdict(
            "reward",
            STOP,
            f"reward_mean 0 on the last {th.window} steps",
            f"data or reward bug: check labels and the reward on {_samples_hint(run)} before spending more compute",
        )
    if all(v >= 1.0 for v in last):
        return Verdict(
            "reward",
            WARN,
            f"reward_mean 1 on the last {th.window} steps",
            "problems too easy: every group is solved, no learning signal; use harder prompts",
        )
    return Verdict("reward", OK, f"reward_mean {last[-1]:.3f} (first {s[0][1]:.3f})")


def check_has_boxed(run: Run, th: Thresholds) -> Verdict:
    s = run.series("has_boxed")
    if not s:
        return Verdict("has_boxed", NA, "no has_boxed in the records")
    last = _mean(_tail(s, th.window))
    first = _mean([v for _, v in s[: th.window]])
    if last < th.has_boxed_min:
        return Verdict(
            "has_boxed", WARN, f"{last:.2f} over the last steps (< {th.has_boxed_min})", "format compliance lost: consider an SFT phase"
        )
    if len(s) >= 2 * th.window and first - last > th.has_boxed_drop:
        return Verdict("has_boxed", WARN, f"fell from {first:.2f} to {last:.2f}", "format compliance dropping: consider an SFT phase")
    return Verdict("has_boxed", OK, f"{last:.2f}")


def check_grad_norm(run: Run, th: Thresholds) -> Verdict:
    s = run.series("grad_norm")
    if not s:
        return Verdict("grad_norm", NA, "no grad_norm yet (no optimizer step)")
    limit = th.grad_factor * th.max_norm
    if len(s) >= th.window and all(v == 0.0 for v in _tail(s, th.window)):
        return Verdict("grad_norm", STOP, f"0 on the last {th.window} steps", "frozen weights: check trainable (LoRA) parameters and lr")
    peaks = run.series("grad_norm_max") or s
    high = [step for step, v in peaks if v > limit]
    if len(s) >= th.window and all(v > limit for v in _tail(peaks, th.window)):
        return Verdict(
            "grad_norm",
            STOP,
            f"> {limit:g} ({th.grad_factor:g} x max_norm) on the last {th.window} steps",
            "lr too high or extreme log-ratios: lower lr, tighten eps_clip (0.2 -> 0.1)",
        )
    if high or run.spikes:
        spike_steps = sorted({int(x.get("global_step", -1)) for x in run.spikes})
        steps = sorted(set(high) | set(spike_steps))
        return Verdict(
            "grad_norm",
            WARN,
            f"spikes at steps {steps[:10]} (max {max(v for _, v in peaks):.1f}; limit {limit:g})",
            f"extreme log-probability ratios: see {run.paths.spike_log if run.paths else SPIKE_FILE}; "
            "tighten eps_clip or lower lr if they recur",
        )
    return Verdict("grad_norm", OK, f"{s[-1][1]:.3g} (max {max(v for _, v in peaks):.3g})")


def check_advantage_std(run: Run, th: Thresholds) -> Verdict:
    s = [(step, v) for step, v in run.series("advantage_std") if step > 1]
    if len(s) < th.window:
        return Verdict("advantage_std", NA, f"{len(s)} steps after step 1; needs {th.window}")
    if all(v == 0.0 for v in _tail(s, th.window)):
        return Verdict("advantage_std", STOP, "0 beyond step 1", "advantage computation bug, or every group has one reward")
    return Verdict("advantage_std", OK, f"{s[-1][1]:.3f}")


def check_truncation(run: Run, th: Thresholds) -> Verdict:
    s = run.series("truncated")
    if not s:
        return Verdict("truncation", NA, "no truncated in the records")
    last = _mean(_tail(s, th.window))
    if last > th.truncation_stop:
        return Verdict(
            "truncation",
            STOP,
            f"{last:.0%} of responses hit the length limit",
            "runaway completions: raise --generate_max_len or add a length penalty",
        )
    if last > th.truncation_warn:
        return Verdict("truncation", WARN, f"{last:.0%} truncated (> {th.truncation_warn:.0%})", "raise --generate_max_len")
    return Verdict("truncation", OK, f"{last:.0%}")


def check_clip_ratio(run: Run, th: Thresholds) -> Verdict:
    s = run.series("ppo_clip_ratio")
    if not s:
        return Verdict("ppo_clip_ratio", NA, "no ppo_clip_ratio in the records")
    last = _mean(_tail(s, th.window))
    if last > th.clip_warn:
        return Verdict("ppo_clip_ratio", WARN, f"{last:.2f} (> {th.clip_warn})", "updates too aggressive: lower the lr")
    return Verdict("ppo_clip_ratio", OK, f"{last:.3f}")


def check_entropy(run: Run, th: Thresholds) -> Verdict:
    s = run.series("entropy_mean")
    if len(s) < 2 * th.window:
        return Verdict("entropy", NA, f"{len(s)} steps with entropy (run with --entropy_loss_coef 0); needs {2 * th.window}")
    base = _mean([v for _, v in s[: th.window]])
    last = _mean(_tail(s, th.window))
    if base <= 0:
        return Verdict("entropy", NA, "baseline entropy is 0")
    ratio = last / base
    detail = f"{last:.3f} nats, {ratio:.0%} of the first steps' {base:.3f}"
    if ratio < th.entropy_stop:
        return Verdict("entropy", STOP, "collapse: " + detail, "mode collapse: raise temperature, lower lr, add KL; check samples")
    if ratio < th.entropy_warn:
        return Verdict("entropy", WARN, "falling: " + detail, "diversity dropping: watch frac_reward_zero_std; consider higher temperature")
    return Verdict("entropy", OK, detail)


def check_zero_std(run: Run, th: Thresholds) -> Verdict:
    s = run.series("frac_reward_zero_std")
    if len(s) < th.window:
        return Verdict("frac_reward_zero_std", NA, f"{len(s)} steps; needs {th.window}")
    last = _tail(s, th.window)
    if all(v > th.zero_std_stop for v in last):
        return Verdict(
            "frac_reward_zero_std",
            STOP,
            f"> {th.zero_std_stop} on the last {th.window} steps ({last[-1]:.2f})",
            "most groups give no learning signal: raise temperature or n_samples_per_prompt, check difficulty",
        )
    if _mean(last) > th.zero_std_warn:
        return Verdict(
            "frac_reward_zero_std", WARN, f"{_mean(last):.2f} (> {th.zero_std_warn})", "little learning signal: more samples per prompt or higher temperature"
        )
    return Verdict("frac_reward_zero_std", OK, f"{_mean(last):.2f}")


def early_stop_action(series: list[tuple[int, float]], key: str, save_steps: int | None) -> str:
    """The checkpoint to keep when held-out eval falls; only steps OpenRLHF saved are named.

    OpenRLHF saves checkpoint ``global_step{N}`` when N % save_steps == 0, so the best eval
    step may have none: then the best eval among saved steps, else the last save before it.
    """
    best_step, best = max(series, key=lambda x: (x[1], -x[0]))
    if save_steps is not None and save_steps <= 0:
        return f"early stop: best {key} {best:.3f} at step {best_step}; the run saves no checkpoints (--save_steps {save_steps})"
    if not save_steps:
        return (
            f"early stop: keep the checkpoint nearest step {best_step} (best {key} {best:.3f}); "
            "pass --save-steps to name one that exists"
        )
    if best_step % save_steps == 0:
        return f"early stop: keep checkpoint global_step{best_step} (best {key} {best:.3f})"
    saved = [(step, v) for step, v in series if step % save_steps == 0]
    if saved:
        step, v = max(saved, key=lambda x: (x[1], -x[0]))
        return (
            f"early stop: keep checkpoint global_step{step} ({key} {v:.3f}, the best eval with a checkpoint; "
            f"the best, {best:.3f} at step {best_step}, has none)"
        )
    before = best_step // save_steps * save_steps
    if before > 0:
        return (
            f"early stop: best {key} {best:.3f} at step {best_step} has no checkpoint; "
            f"the last one before it is global_step{before} (not evaluated)"
        )
    return f"early stop: best {key} {best:.3f} at step {best_step}; no checkpoint at or before step {best_step}"


def check_eval(run: Run, th: Thresholds) -> Verdict:
    keys = run.eval_keys()
    if not keys:
        return Verdict("held-out eval", NA, "no eval points (set --eval_dataset and --eval_steps)")
    worst = Verdict("held-out eval", OK, "")
    details = []
    for key in keys:
        s = run.series(key)
        if not s:
            continue
        best_step, best = max(s, key=lambda x: (x[1], -x[0]))
        details.append(f"{key} {s[-1][1]:.3f} (best {best:.3f} at step {best_step})")
        if len(s) >= 3 and s[-3][1] > s[-2][1] > s[-1][1]:
            train = run.series("correctness")
            rising = len(train) >= 2 and train[-1][1] >= train[0][1]
            action = early_stop_action(s, key, th.save_steps)
            worst = Verdict(
                "held-out eval",
                STOP,
                f"{key} fell at two evals in a row: {s[-3][1]:.3f} -> {s[-2][1]:.3f} -> {s[-1][1]:.3f}"
                + (" while train correctness rose" if rising else ""),
                action,
                _named_checkpoint(action),
            )
    if worst.level == OK:
        worst.detail = "; ".join(details)
    return worst


def check_reward_failures(run: Run, th: Thresholds) -> Verdict:
    s = run.series("reward_failures_count") or run.series("reward_failures")
    failed = [(step, v) for step, v in s if v > 0]
    if not s:
        return Verdict("reward failures", NA, "not logged")
    if failed:
        return Verdict(
            "reward failures",
            WARN,
            f"reward function failed at {len(failed)} step(s), last at step {failed[-1][0]}",
            "read the trainer log for the reward exception; failed samples got the fallback reward",
        )
    return Verdict("reward failures", OK, "none")


def check_length(run: Run, th: Thresholds) -> Verdict:
    s = run.series("response_length")
    if len(s) < 2 * th.window:
        return Verdict("response length", NA, f"{len(s)} steps; needs {2 * th.window}")
    base = _mean([v for _, v in s[: th.window]])
    last = _mean(_tail(s, th.window))
    if base > 0 and last < th.length_drop * base:
        return Verdict(
            "response length",
            WARN,
            f"collapsed to {last:.0f} tokens from {base:.0f}",
            "length collapse: check entropy and samples; add a KL constraint or length penalty",
        )
    return Verdict("response length", OK, f"{last:.0f} tokens (first steps {base:.0f})")


def check_reward_hacking(run: Run, th: Thresholds) -> Verdict:
    s = run.series("high_reward_but_wrong")
    if not s:
        return Verdict("high_reward_but_wrong", NA, "not logged")
    last = _mean(_tail(s, th.window))
    if last > th.hacking_warn:
        return Verdict(
            "high_reward_but_wrong",
            WARN,
            f"{last:.1%} of samples rewarded above 0.5 while wrong",
            "reward hacking: reweight the reward toward correctness; compare with held-out eval",
        )
    return Verdict("high_reward_but_wrong", OK, f"{last:.1%}")


def check_gen_kl(run: Run, th: Thresholds) -> Verdict:
    """The engines must sample from the policy the trainer holds (limits: :mod:`rft.policy_drift`)."""
    s = run.series("gen_kl")
    if not s:
        return Verdict("generation KL", NA, "no gen_kl in the records (metrics_experience.patch logs it)")
    values = [v for _, v in s]
    level = gen_kl_verdict(values)
    worst = max(run.series("gen_kl_seq_max") or s, key=lambda x: x[1])
    detail = f"{values[-1]:.2g} at step {s[-1][0]} (worst sequence {worst[1]:.2g} at step {worst[0]})"
    if level == STOP:
        return Verdict(
            "generation KL",
            STOP,
            f"> {GEN_KL_STOP:g} on the last {GEN_KL_SUSTAINED} steps: " + detail,
            "rollouts are off-policy (merged bf16 sync rounding, a failed sync, or engine and trainer computing "
            f"different functions): serve the adapter natively ({ENV_LORA_SYNC}=native) or compare both modes; "
            "--enable_vllm_is_correction only reweights what was sampled",
        )
    if level == WARN:
        return Verdict(
            "generation KL",
            WARN,
            f"> {GEN_KL_WARN:g} (NeMo-RL's gpt-oss release gate): " + detail,
            "the engines' policy drifts from the trainer's: check the sync mode in run_manifest.json and "
            "sync_served_share; watch whether it keeps rising",
        )
    return Verdict("generation KL", OK, detail)


def check_served_share(run: Run, th: Thresholds) -> Verdict:
    """The engines should serve the whole intended update; the merged bf16 sync loses small ones."""
    s = run.served_share()
    if not s:
        return Verdict("served update", NA, "no sync_delta_norm and sync_target_norm in the records")
    last = _mean(_tail(s, th.window))
    high = 1.0 / SERVED_SHARE_WARN
    detail = f"engines serve {last:.0%} of the intended update (mean of the last {min(th.window, len(s))} syncs)"
    fix = (f": serve the adapter natively ({ENV_LORA_SYNC}=native) and watch gen_kl; if it already is native, "
           "the sync is broken: read the trainer log")
    if last < SERVED_SHARE_WARN:
        return Verdict("served update", WARN, detail + f" (< {SERVED_SHARE_WARN:.0%})",
                       "bf16 rounding of the merged weights drops small updates" + fix)
    if last > high:
        return Verdict("served update", WARN, detail + f" (> {high:.0%}: rounding noise, not the update)",
                       "bf16 rounding of the merged weights moves entries the update did not" + fix)
    return Verdict("served update", OK, detail)


CHECKS = (
    check_files,
    check_nonfinite,
    check_reward,
    check_has_boxed,
    check_grad_norm,
    check_advantage_std,
    check_truncation,
    check_clip_ratio,
    check_entropy,
    check_zero_std,
    check_eval,
    check_length,
    check_reward_hacking,
    check_reward_failures,
    check_gen_kl,
    check_served_share,
)


def effective_thresholds(run: Run, th: Thresholds | None = None) -> Thresholds:
    """``th`` with the run's --save_steps from its manifest when none was given."""
    th = th or Thresholds()
    if th.save_steps is None and run.paths is not None and run.paths.save_steps is not None:
        th = dataclasses.replace(th, save_steps=run.paths.save_steps)
    return th


CHECK_KEYS = {
    "reward": "reward_mean",
    "has_boxed": "has_boxed",
    "grad_norm": "grad_norm",
    "advantage_std": "advantage_std",
    "truncation": "truncated",
    "ppo_clip_ratio": "ppo_clip_ratio",
    "entropy": "entropy_mean",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "response length": "response_length",
    "high_reward_but_wrong": "high_reward_but_wrong",
    "reward failures": "reward_failures_count",
    "generation KL": "gen_kl",
    "served update": "sync_delta_norm",
}
"""The key each check reads: a check whose key went NaN lately cannot say ok."""


def not_ok_when_nonfinite(verdict: Verdict, run: Run, th: Thresholds) -> Verdict:
    """An ok verdict becomes n/a when its key was NaN or inf in the last ``window`` steps.

    Checks read finite values only, so they would judge the last good step and say ok while
    the run is broken; the non-finite check gives the stop.
    """
    key = CHECK_KEYS.get(verdict.check)
    if verdict.level != OK or key is None:
        return verdict
    recent = {int(r["global_step"]) for r in run.records[-th.window :]}
    steps = [step for step, keys in nonfinite_steps(run).items() if key in keys and step in recent]
    if not steps:
        return verdict
    return Verdict(verdict.check, NA, f"{key} NaN or inf at step(s) {format_steps(steps)}: see non-finite values")


def evaluate_run(run: Run, th: Thresholds | None = None) -> list[Verdict]:
    """Every check's verdict."""
    th = effective_thresholds(run, th)
    return [not_ok_when_nonfinite(check(run, th), run, th) for check in CHECKS]


def exit_code(verdicts: list[Verdict]) -> int:
    """0 healthy, 1 warnings, 2 stop."""
    return max((_RANK[v.level] for v in verdicts), default=0)


def format_report(run: Run, verdicts: list[Verdict], source: str) -> str:
    """Plain-text report: one line per check with its action."""
    last = run.records[-1] if run.records else {}
    lines = [f"run: {source}  steps: {len(run.records)}  last step: {last.get('global_step', '-')}  spikes: {len(run.spikes)}"]
    if run.paths is not None:
        samples = run.paths.samples_dir or "not recorded"
        lines.append(f"files ({run.paths.source}): spike log {run.paths.spike_log}; samples {samples}")
    for v in verdicts:
        line = f"{v.level.upper():5} {v.check:22} {v.detail}"
        if v.action and v.level in (WARN, STOP):
            line += f"\n      -> {v.action}"
        lines.append(line)
    code = exit_code(verdicts)
    lines.append(f"verdict: {['HEALTHY', 'WARNINGS', 'STOP'][code]} (exit {code})")
    return "\n".join(lines)


PANELS = (
    ("reward and correctness", ("reward_mean", "correctness", "pass_at_1", "pass_at_all")),
    ("grad norm (pre-clip)", ("grad_norm", "grad_norm_max")),
    ("token entropy (nats)", ("entropy_mean", "entropy_p10", "entropy_p90")),
    ("group signal and format", ("frac_reward_zero_std", "has_boxed", "truncated")),
    ("response length (tokens)", ("response_length", "response_length_max")),
    ("update size", ("ppo_clip_ratio", "ppo_kl", "advantage_std")),
    ("ratio tails", ("log_ratio_abs_p99", "log_ratio_max")),
    ("policy loss", ("policy_loss",)),
    ("engine vs trainer: generation KL (nats)", ("gen_kl", "gen_kl_seq_p99", "gen_kl_seq_max")),
)


LINE_STYLES = (("-", "o", 2.6), ("--", "s", 1.9), ("-.", "^", 1.5), (":", "D", 1.3))
"""Line style, marker and width of a panel's 1st..4th curve: where curves coincide, the wider
solid line still shows under the dashed ones and the markers tell them apart."""
MARKERS_PER_CURVE = 12
"""Markers drawn on a curve (every k-th point), enough to tell curves apart, few enough to read."""
LEGEND_FONT = 10


@dataclass
class Marks:
    """Steps the dashboard marks across its panels."""

    eval_steps: list[int]
    checkpoints: list[int]
    recommended: int | None
    reward_failures: list[int]
    nonfinite: list[int]


def dashboard_marks(run: Run, verdicts: list[Verdict] | None, th: Thresholds) -> Marks:
    """The steps to mark: evals, checkpoints, the checkpoint a verdict recommends, failures, NaN/inf."""
    recommended = next((v.checkpoint for v in verdicts or () if v.level == STOP and v.checkpoint is not None), None)
    return Marks(
        eval_steps=sorted({int(r["global_step"]) for r in run.records if any(k.startswith("eval/") for k in r)}),
        checkpoints=checkpoint_steps(run, th.save_steps),
        recommended=recommended,
        reward_failures=reward_failure_steps(run),
        nonfinite=sorted(nonfinite_steps(run)),
    )


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for step in sorted(steps):
        if out and step == out[-1][1] + 1:
            out[-1] = (out[-1][0], step)
        else:
            out.append((step, step))
    return out


def _plot_curve(ax: Any, series: list[tuple[int, float]], key: str, index: int, **kw) -> None:
    ls, marker, lw = LINE_STYLES[index % len(LINE_STYLES)]
    xs, ys = [x for x, _ in series], [y for _, y in series]
    every = max(1, len(xs) // MARKERS_PER_CURVE)
    ax.plot(xs, ys, ls=ls, marker=marker, lw=lw, ms=5, markevery=(index % every, every), label=key, **kw)


def _mark_steps(ax: Any, marks: Marks) -> None:
    for step in marks.eval_steps:
        ax.axvline(step, color="grey", ls="--", lw=0.7, alpha=0.5)
    for step in marks.checkpoints:
        ax.axvline(step, color="tab:green", ls=":", lw=1.0, alpha=0.7)
    if marks.recommended is not None:
        ax.axvline(marks.recommended, color="darkgreen", ls="-", lw=3.0, alpha=0.8)
    for lo, hi in _ranges(marks.nonfinite):
        ax.axvspan(lo - 0.5, hi + 0.5, color="red", alpha=0.18, lw=0)
    for step in marks.reward_failures:
        ax.axvline(step, color="darkorange", ls="-", lw=1.2, alpha=0.6)


def _marks_legend(marks: Marks) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    if marks.eval_steps:
        handles.append(Line2D([], [], color="grey", ls="--", label="eval step"))
    if marks.checkpoints:
        handles.append(Line2D([], [], color="tab:green", ls=":", label=f"checkpoint ({len(marks.checkpoints)})"))
    if marks.recommended is not None:
        handles.append(Line2D([], [], color="darkgreen", lw=3, label=f"keep global_step{marks.recommended}"))
    if marks.reward_failures:
        handles.append(Line2D([], [], color="darkorange", label=f"reward failures (steps {format_steps(marks.reward_failures)})"))
    if marks.nonfinite:
        handles.append(Patch(color="red", alpha=0.3, label=f"NaN/inf (steps {format_steps(marks.nonfinite)})"))
    return handles


def draw_dashboard(run: Run, verdicts: list[Verdict] | None = None, th: Thresholds | None = None) -> Any:
    """The dashboard figure: the main curves, the eval points, and the marked steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = effective_thresholds(run, th)
    marks = dashboard_marks(run, verdicts, th)
    rows = -(-(len(PANELS) + 1) // 3)  # the panels and the eval panel, three a row
    fig, axes = plt.subplots(rows, 3, figsize=(18, 4.4 * rows))
    for ax in axes.flat[len(PANELS) + 1 :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        index = 0
        for key in keys:
            s = run.series(key)
            if s:
                _plot_curve(ax, s, key, index)
                index += 1
        if title.startswith("reward"):
            std = dict(run.series("reward_std"))
            s = run.series("reward_mean")
            if s and std:
                xs = [x for x, _ in s if x in std]
                ys = [y for x, y in s if x in std]
                ax.fill_between(xs, [y - std[x] for x, y in zip(xs, ys)], [y + std[x] for x, y in zip(xs, ys)], alpha=0.12)
            for key in run.eval_keys():
                e = run.series(key)
                ax.plot([x for x, _ in e], [y for _, y in e], "o--", ms=7, lw=1.2, label=key)
        if title.startswith("grad"):
            ax.axhline(th.grad_factor * th.max_norm, color="red", ls=":", lw=1.2, label=f"{th.grad_factor:g} x max_norm")
            if any(y > 0 for _, y in run.series("grad_norm_max")):
                ax.set_yscale("log")
            spikes = [(s.get("global_step"), s.get("grad_norm")) for s in run.spikes]
            spikes = [(x, y) for x, y in spikes if isinstance(x, (int, float)) and isinstance(y, (int, float))]
            if spikes:
                ax.plot([x for x, _ in spikes], [y for _, y in spikes], "rx", ms=10, mew=2, ls="", label="spike log")
        if title.startswith("engine vs trainer") and run.series("gen_kl"):
            ax.axhline(GEN_KL_WARN, color="darkorange", ls=":", lw=1.2, label=f"warn {GEN_KL_WARN:g}")
            ax.axhline(GEN_KL_STOP, color="red", ls=":", lw=1.2, label=f"stop {GEN_KL_STOP:g} (sustained)")
            if any(y > 0 for _, y in run.series("gen_kl")):
                ax.set_yscale("log")
        _mark_steps(ax, marks)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("global step")
        if ax.lines:
            ax.legend(fontsize=LEGEND_FONT, framealpha=0.85)
        ax.grid(alpha=0.3)
    ax = axes.flat[len(PANELS)]
    for index, key in enumerate(run.eval_keys()):
        _plot_curve(ax, run.series(key), key, index)
    _mark_steps(ax, marks)
    ax.set_title("held-out eval (pass@1)", fontsize=12)
    ax.set_xlabel("global step")
    if ax.lines:
        ax.legend(fontsize=LEGEND_FONT, framealpha=0.85)
    ax.grid(alpha=0.3)
    handles = _marks_legend(marks)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=LEGEND_FONT + 1, frameon=False)
    if verdicts is not None:
        code = exit_code(verdicts)
        flagged = ", ".join(f"{v.check}: {v.level}" for v in verdicts if v.level in (WARN, STOP)) or "all checks ok"
        fig.suptitle(f"{['HEALTHY', 'WARNINGS', 'STOP'][code]} - {flagged}", color=["green", "darkorange", "red"][code], fontsize=14)
    fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.97 if verdicts is not None else 1))  # room for the title
    return fig


def write_dashboard(run: Run, path: Path, verdicts: list[Verdict] | None = None, th: Thresholds | None = None) -> Path:
    """Save :func:`draw_dashboard` as a PNG, whole or not at all (temporary file, then rename)."""
    fig = draw_dashboard(run, verdicts, th)  # selects matplotlib's file-only backend first
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
