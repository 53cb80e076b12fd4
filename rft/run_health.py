"""Run-health checks and dashboard for a GRPO run's metrics directory.

Reads ``training_metrics.jsonl`` (one JSON object per global step, keys defined in
:mod:`rft.metrics_schema`) and ``spike_log.jsonl``, applies the checks of the early
smoke-test table and tuning playbook, and draws the main curves. ``check_run.py`` is the
command-line front end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "training_metrics.jsonl"
SPIKE_FILE = "spike_log.jsonl"

OK, WARN, STOP, NA = "ok", "warn", "stop", "n/a"
EXIT_HEALTHY, EXIT_WARN, EXIT_STOP, EXIT_UNREADABLE = 0, 1, 2, 3
_RANK = {NA: 0, OK: 0, WARN: 1, STOP: 2}


@dataclass
class Run:
    """The step records of a run, one per global step (the last line of a step wins)."""

    records: list[dict]
    spikes: list[dict] = field(default_factory=list)
    bad_lines: int = 0

    def series(self, key: str) -> list[tuple[int, float]]:
        """(global_step, value) of every record that has a finite ``key``."""
        out = []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(r["global_step"]), float(v)))
        return out

    def eval_keys(self) -> list[str]:
        """Held-out pass@1 keys (``eval/{dataset}/{mode}_pass@1``) present in the run."""
        return sorted({k for r in self.records for k in r if k.startswith("eval/") and k.endswith("_pass@1")})


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
    """Outcome of one check."""

    check: str
    level: str
    detail: str
    action: str = ""


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """JSON objects of a file; lines that do not parse (a torn last line) are counted."""
    rows, bad = [], 0
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def load_run(metrics_dir: Path) -> Run:
    """Load a metrics directory; ValueError (naming the file) when there is nothing to read."""
    metrics_dir = Path(metrics_dir)
    path = metrics_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found; pass the run's METRICS_LOG_DIR")
    rows, bad = read_jsonl(path)
    by_step: dict[int, dict] = {}
    for row in rows:
        try:
            by_step[int(row["global_step"])] = row
        except (KeyError, TypeError, ValueError):
            bad += 1
    spikes, _ = read_jsonl(metrics_dir / SPIKE_FILE)
    return Run([by_step[s] for s in sorted(by_step)], current_spikes(spikes, by_step), bad)


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
            "data or reward bug: check labels and the reward on samples_step*.jsonl before spending more compute",
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
            "extreme log-probability ratios: see spike_log.jsonl; tighten eps_clip or lower lr if they recur",
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
            worst = Verdict(
                "held-out eval",
                STOP,
                f"{key} fell at two evals in a row: {s[-3][1]:.3f} -> {s[-2][1]:.3f} -> {s[-1][1]:.3f}"
                + (" while train correctness rose" if rising else ""),
                early_stop_action(s, key, th.save_steps),
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


CHECKS = (
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
)


def evaluate_run(run: Run, th: Thresholds | None = None) -> list[Verdict]:
    """Every check's verdict."""
    th = th or Thresholds()
    return [check(run, th) for check in CHECKS]


def exit_code(verdicts: list[Verdict]) -> int:
    """0 healthy, 1 warnings, 2 stop."""
    return max((_RANK[v.level] for v in verdicts), default=0)


def format_report(run: Run, verdicts: list[Verdict], source: str) -> str:
    """Plain-text report: one line per check with its action."""
    last = run.records[-1] if run.records else {}
    lines = [f"run: {source}  steps: {len(run.records)}  last step: {last.get('global_step', '-')}  spikes: {len(run.spikes)}"]
    if run.bad_lines:
        lines.append(f"note: {run.bad_lines} unreadable line(s) skipped")
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
)


def write_dashboard(run: Run, path: Path, verdicts: list[Verdict] | None = None, th: Thresholds | None = None) -> Path:
    """PNG of the main curves; eval points are marked on the reward panel and in their own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = th or Thresholds()
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    eval_steps = sorted({int(r["global_step"]) for r in run.records if any(k.startswith("eval/") for k in r)})
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            s = run.series(key)
            if s:
                ax.plot([x for x, _ in s], [y for _, y in s], label=key, lw=1.2)
        if title.startswith("reward"):
            std = dict(run.series("reward_std"))
            s = run.series("reward_mean")
            if s and std:
                xs = [x for x, _ in s if x in std]
                ys = [y for x, y in s if x in std]
                ax.fill_between(xs, [y - std[x] for x, y in zip(xs, ys)], [y + std[x] for x, y in zip(xs, ys)], alpha=0.15)
            for key in run.eval_keys():
                e = run.series(key)
                ax.plot([x for x, _ in e], [y for _, y in e], "o--", ms=6, label=key)
        if title.startswith("grad"):
            ax.axhline(th.grad_factor * th.max_norm, color="red", ls=":", lw=1, label=f"{th.grad_factor:g} x max_norm")
            if any(y > 0 for _, y in run.series("grad_norm_max")):
                ax.set_yscale("log")
            for spike in run.spikes:
                ax.plot([spike.get("global_step", 0)], [spike.get("grad_norm", 0)], "rx", ms=8)
        for step in eval_steps:
            ax.axvline(step, color="grey", ls="--", lw=0.6, alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("global step")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes.flat[-1]
    for key in run.eval_keys():
        e = run.series(key)
        ax.plot([x for x, _ in e], [y for _, y in e], "o-", label=key)
    ax.set_title("held-out eval (pass@1)")
    ax.set_xlabel("global step")
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if verdicts is not None:
        code = exit_code(verdicts)
        flagged = ", ".join(f"{v.check}: {v.level}" for v in verdicts if v.level in (WARN, STOP)) or "all checks ok"
        fig.suptitle(f"{['HEALTHY', 'WARNINGS', 'STOP'][code]} - {flagged}", color=["green", "darkorange", "red"][code])
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
