"""The run's own logs, written by OpenRLHF's PPO trainer (metrics_trainer.patch).

OpenRLHF 0.9.3 prints a step's status and hands it to wandb or TensorBoard; nothing is left on
disk that a health check can read while the run goes on. The patch calls :class:`TrainerRunLog`
from ``BasePPOTrainer`` (``trainer/ppo_trainer.py``) and it writes, in the single controller:

* ``$METRICS_LOG_DIR/training_metrics.jsonl``: one JSON object per global step (the status,
  the exact rollout metrics of :mod:`rft.openrlhf.rollout_stats`, phase seconds, weight-sync
  statistics, eval metrics on eval steps); keys defined in ``rft/metrics_schema.py``;
* ``$METRICS_LOG_DIR/learning.log``: the same step as one line, for ``tail -f``;
* ``$SAMPLES_LOG_DIR/samples_step{N}.jsonl`` on checkpoint steps: prompt, response, label,
  reward logs and the answer the reward extracted;
* ``$SPIKE_LOG_PATH``: one record per optimizer step whose grad norm exceeds ``$SPIKE_GRAD_NORM``.

Writing never stops training and never leaves a torn line: each line is built whole and
appended with one ``os.write`` on an ``O_APPEND`` descriptor, and a short or failed write is
truncated back. A full disk costs the records written while it is full: every later step tries
again, the first failure says records are being lost, and the first success says how many were
lost (the step record then carries ``metrics_records_lost``). A resumed run moves the lines of
the steps it repeats to ``training_metrics.superseded.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from rft.contract import (
    DEFAULT_SAMPLES_LOG_COUNT,
    DEFAULT_SPIKE_GRAD_NORM,
    ENV_METRICS_DIR,
    ENV_SAMPLES_COUNT,
    ENV_SAMPLES_DIR,
    ENV_SPIKE_GRAD_NORM,
    ENV_SPIKE_PATH,
    LEARNING_LOG,
    METRICS_FILE,
    PARSE_METHOD_NAMES,
    RUN_LOG_ENV_VARS,
    SAMPLES_GLOB,
    SPIKE_FILE,
    SUPERSEDED_FILE,
    TEXT_LOG_KEYS,
    samples_file,
)
from rft.openrlhf.eval_modes import info_value
from rft.openrlhf.rollout_stats import prompt_token_hashes
from rft.policy_drift import served_share

logger = logging.getLogger(__name__)

RECORDS_LOST_KEY = "metrics_records_lost"
"""Key of the first step record written after a failure: how many step records were lost before it."""

SAMPLE_INFO_KEYS = (
    "reward",
    "score",
    "correctness",
    "has_answer",
    "has_boxed",
    "boxed_in_final",
    "truncated_response",
    "reward_failures",
    "truncated",
    "response_length",
)
"""Per-sample info values copied into each row of the samples log."""

PROMPT_CHARS_IN_SPIKES = 500
"""Characters of each prompt a spike record keeps (enough to recognise it, not a data dump)."""


# ------------------------------------------------------------------------------ settings


def run_log_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The run-log settings of this process that are set; directories and paths made absolute."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in RUN_LOG_ENV_VARS:
        value = str(environ.get(name, "")).strip()
        if value:
            if name.endswith(("_DIR", "_PATH")):
                value = os.path.abspath(os.path.expanduser(value))
            out[name] = value
    return out


def remote_with_run_log_env(cls: type) -> Any:
    """``ray.remote`` that hands the launcher's run-log settings to the actor's environment.

    The trainer actor may run in a Ray cluster started elsewhere, whose workers never saw the
    launcher's environment; Ray merges these ``env_vars`` into the job's runtime_env.
    """
    import ray

    env = run_log_env()
    return ray.remote(runtime_env={"env_vars": env})(cls) if env else ray.remote(cls)


def float_setting(environ: Mapping[str, str], name: str, default: float) -> float:
    """A numeric environment setting; a value that is not a number gives one warning and ``default``."""
    try:
        return float(environ.get(name, "") or default)
    except ValueError:
        logger.warning(f"{name}={environ.get(name)!r} is not a number; using {default} (set {name} to a number)")
        return default


# ------------------------------------------------------------------------------ records


def numeric_metrics(logs: Mapping[str, Any]) -> tuple[dict[str, Optional[float]], list[str]]:
    """Numbers of a status dict as JSON-safe floats; NaN and infinity become None and are listed.

    Anything else (``generated_samples``, a None pass rate) is left out.
    """
    out, nonfinite = {}, []
    for key, value in logs.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            continue
        value = float(value)
        out[key] = value if math.isfinite(value) else None
        if out[key] is None:
            nonfinite.append(key)
    return out, nonfinite


def step_record(
    global_step: int, logs: Mapping[str, Any], eval_logs: Mapping[str, Any], episode: Any, checkpoint_seconds: float
) -> dict:
    """The step's JSON object: status numbers, checkpoint time, then eval numbers as ``eval/...``."""
    values, nonfinite = numeric_metrics(logs)
    eval_values, eval_nonfinite = numeric_metrics({f"eval/{k}": v for k, v in eval_logs.items()})
    record = {
        "global_step": global_step,
        "episode": episode,
        "timestamp": time.time(),
        **values,
        "checkpoint_seconds": checkpoint_seconds,
        **eval_values,
    }
    if nonfinite or eval_nonfinite:
        record["nonfinite_keys"] = nonfinite + eval_nonfinite
    return record


def _fmt(record: Mapping[str, Any], key: str, spec: str) -> str:
    """``record[key]`` formatted, or ``n/a`` when the step did not log it."""
    value = record.get(key)
    return "n/a" if value is None else format(value, spec)


LEARNING_LOG_FIELDS = (
    ("loss", "policy_loss", "+.4f"),
    ("grad", "grad_norm", ".4f"),
    ("grad_max", "grad_norm_max", ".4f"),
    ("lr", "lr", ".2e"),
    ("correct", "correctness", ".3f"),
    ("pass@1", "pass_at_1", ".3f"),
    ("pass@all", "pass_at_all", ".3f"),
    ("entropy", "entropy_mean", ".3f"),
    ("frac_zero_std", "frac_reward_zero_std", ".2f"),
    ("truncated", "truncated", ".2f"),
    ("clip", "ppo_clip_ratio", ".3f"),
)
"""(label, record key, format) of the fields of a learning.log line after the reward."""


def learning_log_line(record: Mapping[str, Any]) -> str:
    """One human-readable line of a step record, for ``tail -f learning.log``."""
    stamp = datetime.fromtimestamp(record.get("timestamp", time.time()), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [stamp, f"step={record.get('global_step')}"]
    parts += [f"{label}={_fmt(record, key, spec)}" for label, key, spec in LEARNING_LOG_FIELDS[:4]]
    parts.append(f"reward={_fmt(record, 'reward_mean', '.3f')}\u00b1{_fmt(record, 'reward_std', '.3f')}")
    parts += [f"{label}={_fmt(record, key, spec)}" for label, key, spec in LEARNING_LOG_FIELDS[4:]]
    for key in sorted(k for k in record if k.startswith("eval/") and "_pass@" in k):
        parts.append(f"{key}={_fmt(record, key, '.3f')}")
    return " ".join(parts)


def step_of_line(line: str) -> Optional[int]:
    """global_step of a metrics JSON line or a learning.log line; None if unreadable (a torn line)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            return int(json.loads(line)["global_step"])
        except (ValueError, KeyError, TypeError):
            return None
    for token in line.split():
        if token.startswith("step="):
            try:
                return int(token[5:])
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------------------ files


def append_whole(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all.

    One ``os.write`` on an ``O_APPEND`` descriptor; when it fails or writes only part (a full
    disk), the file is truncated back to its size before, so no reader ever sees a torn line.
    Raises OSError on failure.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            _truncate(fd, size)
            raise
        if written != len(data):
            _truncate(fd, size)
            raise OSError(28, f"No space left on device (wrote {written} of {len(data)} bytes)")
    finally:
        os.close(fd)


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # the write already failed; that error is the one to report


def replace_whole(path: str, data: bytes) -> None:
    """Write ``path`` through ``path.tmp.PID`` and rename; on failure the temp file is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Rows as JSON lines (UTF-8); raises on a value JSON cannot hold, before anything is written."""
    return "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


@dataclass
class TargetHealth:
    """Write health of one log file: whether it is failing and how many records it lost meanwhile."""

    what: str
    failing: bool = False
    lost: int = 0


class RunLogWriter:
    """Appends the run logs. A failed write costs its record and one warning per outage, never training."""

    def __init__(
        self,
        metrics_dir: Optional[str] = None,
        samples_dir: Optional[str] = None,
        spike_path: Optional[str] = None,
        spike_grad_norm: float = DEFAULT_SPIKE_GRAD_NORM,
        samples_count: int = DEFAULT_SAMPLES_LOG_COUNT,
        run_id: Optional[str] = None,
    ):
        self.metrics_dir = metrics_dir
        self.samples_dir = samples_dir
        self.spike_path = spike_path or (os.path.join(metrics_dir, SPIKE_FILE) if metrics_dir else None)
        self.spike_grad_norm = spike_grad_norm
        self.samples_count = samples_count
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.health = {
            "metrics": TargetHealth("step records"),
            "learning_log": TargetHealth("learning.log lines"),
            "samples": TargetHealth("sample files"),
            "spikes": TargetHealth("spike records"),
        }
        self._resume_checked = False
        if not metrics_dir:
            logger.warning(f"run logs: {ENV_METRICS_DIR} is not set: no {METRICS_FILE} or {LEARNING_LOG}; training goes on")
        if not samples_dir:
            logger.warning(f"run logs: {ENV_SAMPLES_DIR} is not set: no {SAMPLES_GLOB} files; training goes on")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "RunLogWriter":
        """The writer the launcher's environment asks for (``rft.contract.RUN_LOG_ENV_VARS``)."""
        environ = os.environ if environ is None else environ
        env = run_log_env(environ)
        return cls(
            metrics_dir=env.get(ENV_METRICS_DIR),
            samples_dir=env.get(ENV_SAMPLES_DIR),
            spike_path=env.get(ENV_SPIKE_PATH),
            spike_grad_norm=float_setting(environ, ENV_SPIKE_GRAD_NORM, DEFAULT_SPIKE_GRAD_NORM),
            samples_count=int(float_setting(environ, ENV_SAMPLES_COUNT, DEFAULT_SAMPLES_LOG_COUNT)),
        )

    def _attempt(self, target: str, path: str, write: Callable[[], None]) -> bool:
        """Run ``write``; keep ``target``'s health and say once when it starts and stops failing."""
        health = self.health[target]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write()
        except (OSError, TypeError, ValueError) as e:
            health.lost += 1
            if not health.failing:
                health.failing = True
                reason = getattr(e, "strerror", None) or e
                logger.warning(
                    f"run logs: cannot write {path} ({reason}); {health.what} are being lost and every later "
                    "step tries again (free space or set a writable directory); training goes on"
                )
            return False
        if health.failing:
            logger.warning(f"run logs: writing {path} again; {health.lost} {health.what} were lost meanwhile")
        health.failing, health.lost = False, 0
        return True

    def _drop_from_step(self, path: str, step: int, superseded: Optional[str]) -> int:
        """Remove lines of steps >= ``step`` and torn lines (left by a run that resumed from a checkpoint)."""
        if not os.path.exists(path):
            return 0
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        keep, drop = [], []
        for line in lines:
            line_step = step_of_line(line)
            torn = not line.endswith("\n")
            (drop if torn or (line_step is not None and line_step >= step) else keep).append(line)
        if drop:
            if superseded:
                append_whole(superseded, "".join(x if x.endswith("\n") else x + "\n" for x in drop).encode("utf-8"))
            replace_whole(path, "".join(keep).encode("utf-8"))
        return len(drop)

    def _check_resume(self, step: int) -> None:
        """First write of this process: a resumed run moves aside the steps it will log again."""
        if self._resume_checked or not self.metrics_dir:
            return
        self._resume_checked = True
        try:
            metrics = os.path.join(self.metrics_dir, METRICS_FILE)
            dropped = self._drop_from_step(metrics, step, os.path.join(self.metrics_dir, SUPERSEDED_FILE))
            self._drop_from_step(os.path.join(self.metrics_dir, LEARNING_LOG), step, None)
        except OSError as e:
            logger.warning(f"run logs: cannot move repeated steps aside in {self.metrics_dir} ({e}); training goes on")
            return
        if dropped:
            logger.info(f"run logs: resumed at step {step}; moved {dropped} later line(s) to {SUPERSEDED_FILE}")

    def write_step(self, record: Mapping[str, Any]) -> bool:
        """Append one step record to training_metrics.jsonl and its line to learning.log; True if the record landed."""
        if not self.metrics_dir:
            return False
        record = {"run_id": self.run_id, **record}
        if self.health["metrics"].lost:
            record[RECORDS_LOST_KEY] = self.health["metrics"].lost
        self._check_resume(int(record["global_step"]))
        metrics = os.path.join(self.metrics_dir, METRICS_FILE)
        if not self._attempt("metrics", metrics, lambda: append_whole(metrics, jsonl([record]))):
            return False
        log = os.path.join(self.metrics_dir, LEARNING_LOG)
        self._attempt("learning_log", log, lambda: append_whole(log, (learning_log_line(record) + "\n").encode("utf-8")))
        return True

    def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Write samples_step{step}.jsonl whole (temp file, then rename); True if it landed."""
        if not self.samples_dir or not rows:
            return False
        path = os.path.join(self.samples_dir, samples_file(step))
        return self._attempt("samples", path, lambda: replace_whole(path, jsonl(rows)))

    def write_spikes(self, step: int, details: Sequence[Mapping[str, Any]], prompts_by_hash: Mapping[str, str]) -> int:
        """Append one record per optimizer step whose grad norm exceeds the threshold; the number written."""
        if not self.spike_path:
            return 0
        count = 0
        for index, detail in enumerate(details):
            norm = detail.get("grad_norm")
            if norm is None or not norm > self.spike_grad_norm:
                continue
            hashes = detail.get("prompt_hashes", [])
            record = {
                "run_id": self.run_id,
                "global_step": step,
                "optimizer_step_in_rollout": index,
                "timestamp": time.time(),
                "threshold": self.spike_grad_norm,
                **{k: v for k, v in detail.items() if k != "prompt_hashes"},
                "prompt_hashes": hashes,
                "prompts": {h: prompts_by_hash[h][:PROMPT_CHARS_IN_SPIKES] for h in hashes if h in prompts_by_hash},
            }
            count += self._attempt("spikes", self.spike_path, lambda r=record: append_whole(self.spike_path, jsonl([r])))
        return count


# ------------------------------------------------------------------------------ rollouts


def sync_metrics(results: Any) -> dict[str, float]:
    """The first rank's numeric weight-sync statistics from the ``broadcast_to_vllm`` results."""
    first = results[0] if isinstance(results, (list, tuple)) and results else results
    if not isinstance(first, dict):
        return {}
    out = {k: float(v) for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "sync_delta_norm" in out and "sync_target_norm" in out:
        try:
            out["sync_served_share"] = served_share(out["sync_delta_norm"], out["sync_target_norm"])
        except ValueError:  # a non-finite norm: the record's nonfinite check reports the norms themselves
            pass
    return out


def pop_text_logs(experiences: Sequence[Any]) -> list[dict[str, list]]:
    """Take the reward's text logs out of each experience's info; one dict per experience.

    They must leave before the experiences go to the policy actors, which average every info key
    (a string there stops the step); the samples log reads them from here.
    """
    return [{key: list(e.info.pop(key)) for key in TEXT_LOG_KEYS if key in e.info} for e in experiences]


def sample_rows(
    experiences: Sequence[Any],
    tokenizer: Any,
    step: int,
    limit: int,
    text_logs: Optional[Sequence[Mapping[str, Sequence]]] = None,
) -> list[dict]:
    """Prompt, decoded response, label, reward logs and the reward's text logs of the first ``limit`` samples."""
    rows: list[dict] = []
    for index, experience in enumerate(experiences):
        hashes = prompt_token_hashes(experience.sequences, experience.action_mask)
        texts = text_logs[index] if text_logs and index < len(text_logs) else {}
        for i in range(len(experience.sequences)):
            if len(rows) >= limit:
                return rows
            # action_mask[j] marks sequences[j + 1]: the response is the masked tail.
            sequence, mask = experience.sequences[i].cpu(), experience.action_mask[i].bool().cpu()
            n = min(sequence.numel() - 1, mask.numel())
            row = {
                "global_step": step,
                "sample": len(rows),
                "prompt_hash": hashes[i],
                "prompt": experience.prompts[i] if i < len(experience.prompts) else None,
                "label": experience.labels[i] if i < len(experience.labels) else None,
                "response": tokenizer.decode(sequence[1 : 1 + n][mask[:n]].tolist(), skip_special_tokens=False),
            }
            row.update({key: info_value(experience, key, i) for key in SAMPLE_INFO_KEYS})
            code = info_value(experience, "parse_method", i)
            row["parse_method"] = PARSE_METHOD_NAMES.get(code, code)
            row.update({key: values[i] if i < len(values) else None for key, values in texts.items()})
            rows.append(row)
    return rows


def prompts_by_hash(experiences: Sequence[Any]) -> dict[str, str]:
    """Prompt text of every prompt-token hash in a rollout (the spike log names prompts by hash)."""
    out: dict[str, str] = {}
    for experience in experiences:
        for h, prompt in zip(prompt_token_hashes(experience.sequences, experience.action_mask), experience.prompts):
            out.setdefault(h, prompt)
    return out


# ------------------------------------------------------------------------------ the trainer's hooks


class TrainerRunLog:
    """What ``BasePPOTrainer`` calls, in the order of a step; no call raises into training.

    ``generation_started`` (sync ``fit``), ``start_step``, ``rollout_made``, ``lap``,
    ``sync_done``, ``finish_step`` (``train_step``), ``run_eval`` (``fit``), ``write_step``
    (``save_logs_and_checkpoints``). Phase seconds are laps between these calls.
    """

    def __init__(self, writer: RunLogWriter):
        self.writer = writer
        self.phases: dict[str, float] = {}
        self.eval_logs: dict[str, float] = {}
        self.sync: dict[str, float] = {}
        self.step = 0
        self._generation_start: Optional[float] = None
        self._lap_start = time.monotonic()
        self._prompts_by_hash: dict[str, str] = {}

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "TrainerRunLog":
        """The hooks over the writer the launcher's environment asks for (what ``BasePPOTrainer`` builds)."""
        return cls(RunLogWriter.from_env(environ))

    def lap(self, phase: Optional[str] = None) -> float:
        """Seconds since the previous lap, recorded as ``phase`` when named."""
        now = time.monotonic()
        seconds, self._lap_start = now - self._lap_start, now
        if phase:
            self.phases[phase] = seconds
        return seconds

    def generation_started(self) -> None:
        """The sync trainer starts generating a rollout batch (rewards included)."""
        self._generation_start = time.monotonic()

    def start_step(self) -> None:
        """A rollout batch reaches ``train_step``: forget the last step's phases and sync statistics."""
        self.phases, self.sync = {}, {}
        self.lap()
        if self._generation_start is not None:
            self.phases["generation_seconds"] = time.monotonic() - self._generation_start
            self._generation_start = None

    def rollout_made(self, experiences: Sequence[Any], step: int, save_steps: float, tokenizer: Any) -> None:
        """After experience making: time it, take the text logs out, write the samples log on save steps."""
        self.lap("experience_seconds")
        self.step = step
        text_logs = pop_text_logs(experiences)  # always, even if logging fails below: actors cannot take text
        try:
            self._prompts_by_hash = prompts_by_hash(experiences)
            if self.writer.samples_dir and 0 < save_steps < float("inf") and step % save_steps == 0:
                rows = sample_rows(experiences, tokenizer, step, self.writer.samples_count, text_logs)
                self.writer.write_samples(step, rows)
        except Exception as e:  # noqa: BLE001 - logging never stops training
            logger.warning(f"samples log of step {step} skipped: {type(e).__name__}: {e}")

    def sync_done(self, results: Any) -> None:
        """Keep the weight-sync statistics ``broadcast_to_vllm`` returned (first rank)."""
        self.sync = sync_metrics(results)

    def finish_step(self, status: dict, experience_maker: Any) -> None:
        """Complete ``status``: exact rollout metrics replace the actors' means of the same keys.

        The mean of parse_method codes means nothing (its shares are logged instead); the
        per-optimizer-step details go to the spike log, not into the status.
        """
        details = status.pop("optimizer_step_details", None) or []
        status.update(getattr(experience_maker, "batch_metrics", None) or {})
        status.pop("parse_method", None)
        status.update(self.sync)
        status.update(self.phases)
        try:
            self.writer.write_spikes(self.step, details, self._prompts_by_hash)
        except Exception as e:  # noqa: BLE001 - logging never stops training
            logger.warning(f"spike log of step {self.step} skipped: {type(e).__name__}: {e}")

    def run_eval(self, evaluate: Callable[..., Any], global_step: int, generate_kwargs: Mapping[str, Any]) -> None:
        """Run ``evaluate`` and keep its logs for this step's record; a failed eval costs only the eval."""
        start = time.monotonic()
        try:
            self.eval_logs = dict(evaluate(global_step, **generate_kwargs) or {})
            self.eval_logs["seconds"] = time.monotonic() - start
        except Exception as e:  # noqa: BLE001 - a failed eval must not cost the checkpoint
            logger.error(f"eval at step {global_step} failed ({type(e).__name__}: {e}); training goes on")

    def write_step(self, global_step: int, logs: Mapping[str, Any], client_states: Optional[Mapping[str, Any]]) -> None:
        """Write the step's record; the checkpoint seconds are the lap since ``save_logs_and_checkpoints`` began."""
        checkpoint_seconds = self.lap()
        try:
            episode = (client_states or {}).get("episode")
            record = step_record(global_step, logs, self.eval_logs, episode, checkpoint_seconds)
            self.eval_logs = {}
            self.writer.write_step(record)
        except Exception as e:  # noqa: BLE001 - logging never stops training
            logger.warning(f"metrics record of step {global_step} skipped: {type(e).__name__}: {e}")
