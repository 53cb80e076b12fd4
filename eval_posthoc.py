#!/usr/bin/env python
"""Evaluate saved checkpoints: three labelled eval modes, honest statistics, resumable output.

Examples (see docs/eval.md):

  # A LoRA adapter against its base, OOD probe, primary mode, on 8 GPUs with vLLM
  python eval_posthoc.py --base openai/gpt-oss-20b --model base=openai/gpt-oss-20b \\
      --adapter a30_step130=/mnt/data/rft_checkpoints/a30/global_step130_hf \\
      --baseline base --dataset data/probe_set_200_ood.jsonl --modes greedy_pass@1 \\
      --tensor-parallel-size 8 --output-dir /mnt/scratch/eval_posthoc/a30

  # The same on CPU with the transformers backend (small models only)
  python eval_posthoc.py --backend hf --adapter a=ADAPTER --base BASE --dataset data.jsonl

Modes (never mixed; every number is reported with its mode and dataset):
  greedy_pass@1        temperature 0, 1 sample per problem (primary)
  sampling_pass@N      temperature 0.6, N samples (pass@k for k <= N, maj@N)
  nondet_proxy_pass@N  temperature 0, N samples: batching nondeterminism, diagnostics only

Prompts are built as training builds them: the prompt specification of
rft/prompt_spec.py (the tokenizer's chat template, the reasoning effort, the pinned
date line) on [{"role": "user", "content": input}] with the generation prompt,
tokenized without extra special tokens. --manifest RUN/run_manifest.json takes the
run's effort, date, template and token budget; a setting given here that differs
from the run's is said and labelled. Responses are scored with reward_func_em.py,
so training and evaluation count the same answers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from rft import eval_stats
from rft.contract import MANIFEST_ARGS, MANIFEST_PROMPT_SPEC, RUN_MANIFEST
from rft.patching import pid_running
from rft.prompt_spec import DEFAULT_DATE, DEFAULT_EFFORT, EFFORTS, PromptSpec, PromptSpecError, check_date, render
from rft.eval_backends import Backend, GenRequest, GenResult
from rft.eval_io import (
    EvalInputError,
    Problem,
    SampleStore,
    atomic_write_text,
    dir_content_sha256,
    file_sha256,
    load_problems,
    model_dir_fingerprint,
    run_key,
    safe_name,
)

DEFAULT_SAMPLING_TEMPERATURE = 0.6
DEFAULT_MAX_TOKENS = 3072
MERGE_RECORD = "rft_merge.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
INTEGER_RE = re.compile(r"-?\d+")
"""A label the integer-answer reward can match: its normalized form is a whole number."""
WORK_DIR_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>merging|old)-(?P<pid>\d+)(?:@(?P<host>[^/]+))?$")
"""Temporary folders of a merge in --merged-dir: ``.NAME.merging-PID@HOST`` and ``.NAME.old-PID@HOST``."""


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """An eval mode: its label, sampling temperature, samples per problem and top-p."""

    name: str
    temperature: float
    n: int
    top_p: float = 1.0


def parse_mode(text: str, sampling_temperature: float = DEFAULT_SAMPLING_TEMPERATURE, top_p: float = 1.0) -> Mode:
    """Parse ``greedy_pass@1``, ``sampling_pass@N`` or ``nondet_proxy_pass@N``.

    A sampling temperature other than 0.6 is written into the label
    (``sampling_t0.8_pass@8``), so differently sampled numbers never share a name.
    """
    m = re.fullmatch(r"(greedy|sampling|nondet_proxy)_pass@(\d+)", text.strip())
    if not m:
        raise EvalInputError(
            f"unknown mode {text!r}; use greedy_pass@1, sampling_pass@N or nondet_proxy_pass@N (e.g. sampling_pass@8)"
        )
    kind, n = m.group(1), int(m.group(2))
    if n < 1:
        raise EvalInputError(f"mode {text!r}: the number of samples must be at least 1")
    if kind == "greedy":
        if n != 1:
            raise EvalInputError(f"mode {text!r}: greedy is one sample; repeated greedy runs are nondet_proxy_pass@{n}")
        return Mode("greedy_pass@1", 0.0, 1, 1.0)
    if kind == "nondet_proxy":
        return Mode(f"nondet_proxy_pass@{n}", 0.0, n, 1.0)
    if sampling_temperature <= 0:
        raise EvalInputError("--sampling-temperature must be > 0 (temperature 0 is greedy_pass@1 or nondet_proxy_pass@N)")
    label = "sampling" if sampling_temperature == DEFAULT_SAMPLING_TEMPERATURE and top_p == 1.0 else (
        f"sampling_t{sampling_temperature:g}" + ("" if top_p == 1.0 else f"_p{top_p:g}")
    )
    return Mode(f"{label}_pass@{n}", float(sampling_temperature), n, float(top_p))


# --------------------------------------------------------------------------- prompts


def build_prompt(tokenizer: Any, model_input: Any, spec: PromptSpec) -> str:
    """The prompt string exactly as the patched OpenRLHF builds it with ``--apply_chat_template``.

    A string input becomes one user message; a list is taken as the chat itself. The render is
    :func:`rft.prompt_spec.render`, the one the training prompt dataset calls.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise EvalInputError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template; training applies one "
            "(--apply_chat_template), so evaluate with a tokenizer that has it (--tokenizer)"
        )
    try:
        return render(tokenizer, model_input, spec)
    except PromptSpecError as e:
        raise EvalInputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: {e}") from None


@dataclass(frozen=True)
class PromptSettings:
    """The prompt and budget settings of this eval, and how they compare with the run's."""

    reasoning_effort: str
    prompt_date: str
    max_tokens: int
    template_sha256: str | None  # the run's template, when the manifest names it
    differs_from_run: tuple[str, ...] = ()  # settings given here that the run did not use

    def spec(self, tokenizer: Any) -> PromptSpec:
        """The spec for ``tokenizer``; the run's template when known (another template is refused)."""
        if self.template_sha256:
            return PromptSpec(self.template_sha256, self.reasoning_effort, self.prompt_date)
        try:
            return PromptSpec.for_tokenizer(tokenizer, self.reasoning_effort, self.prompt_date)
        except PromptSpecError as e:
            raise EvalInputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: {e}") from None


def read_manifest(path: str) -> dict[str, Any]:
    """A run's ``run_manifest.json`` (a file, or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / RUN_MANIFEST
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalInputError(f"--manifest {p}: cannot read it as JSON ({_first_line(e)}); give the run's {RUN_MANIFEST}") from None
    if not isinstance(manifest, dict):
        raise EvalInputError(f"--manifest {p}: not a run manifest (a JSON object); give the run's {RUN_MANIFEST}")
    return manifest


def prompt_settings(args: argparse.Namespace, manifest: dict[str, Any] | None) -> PromptSettings:
    """Effort, date and budget: given here, else the run's (manifest), else the defaults.

    A setting given here that differs from the run's is kept (the user asked for it) and
    listed in ``differs_from_run`` so that every output labels it.
    """
    run_args = (manifest or {}).get(MANIFEST_ARGS) or {}
    run_spec = (manifest or {}).get(MANIFEST_PROMPT_SPEC) or {}
    run = {
        "reasoning_effort": run_args.get("reasoning_effort", run_spec.get("reasoning_effort")),
        "prompt_date": run_args.get("prompt_date", run_spec.get("date")),
        "max_tokens": run_args.get("generate_max_len"),
    }
    given = {"reasoning_effort": args.reasoning_effort, "prompt_date": args.prompt_date, "max_tokens": args.max_tokens}
    defaults = {"reasoning_effort": DEFAULT_EFFORT, "prompt_date": DEFAULT_DATE, "max_tokens": DEFAULT_MAX_TOKENS}
    chosen = {k: given[k] if given[k] is not None else run[k] if run[k] is not None else defaults[k] for k in given}
    differs = tuple(k for k in given if manifest is not None and given[k] is not None and run[k] is not None
                    and given[k] != run[k])
    try:
        check_date(chosen["prompt_date"])
    except PromptSpecError as e:
        raise EvalInputError(str(e).replace("PROMPT_DATE", "--prompt-date")) from None
    if chosen["reasoning_effort"] not in EFFORTS:
        raise EvalInputError(f"the run's reasoning effort {chosen['reasoning_effort']!r} is not one of {', '.join(EFFORTS)}")
    return PromptSettings(chosen["reasoning_effort"], chosen["prompt_date"], int(chosen["max_tokens"]),
                          run_spec.get("template_sha256"), differs)


def prompt_token_ids(tokenizer: Any, prompt: str, prompt_max_len: int | None = None) -> tuple[list[int], bool]:
    """Token ids of a prompt as training makes them; keeps the last ``prompt_max_len`` if longer.

    Returns the ids and whether they were cut.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if prompt_max_len is not None and len(ids) > prompt_max_len:
        return ids[-prompt_max_len:], True
    return ids, False


def sample_seed(base_seed: int, problem: int, sample: int) -> int:
    """A per-sample seed that does not depend on batching or on which samples already exist."""
    digest = hashlib.sha256(f"{base_seed}:{problem}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- scoring


def load_scorer() -> Any:
    """Import ``reward_func_em`` (the training reward) by module name."""
    try:
        import reward_func_em
    except ImportError as e:
        raise EvalInputError(
            f"cannot import reward_func_em ({e}); run eval_posthoc.py from the repository root, where reward_func_em.py lives"
        ) from None
    return reward_func_em


def score_sample(scorer: Any, response: str, label: str) -> dict[str, Any]:
    """Score one response with the training reward's extraction; never raises.

    Returns ``correct``, the reward's flags, the extracted answer ``pred`` and its
    normalized form ``pred_norm`` (the maj@n vote). A scorer failure scores the
    sample as wrong and records the error, so one bad sample cannot stop a run.
    """
    try:
        flags = {k: float(v) for k, v in scorer.score_response(response, label).items()}
        # The answer the reward compared: final-channel text, then last box or last number.
        pred, _ = scorer.extract_answer(scorer.extract_final_text(response))
        pred_norm = scorer.normalize_answer(pred) if pred is not None else None
        return {
            "correct": flags["correctness"] > 0.5,
            "pred": pred,
            "pred_norm": pred_norm if pred_norm not in ("", None) else None,
            "score": flags,
            "score_error": None,
        }
    except Exception as e:  # noqa: BLE001 - a metric must not stop the evaluation
        return {"correct": False, "pred": None, "pred_norm": None, "score": None, "score_error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """A model to evaluate: a merged HF model path, or an adapter to merge into ``base``."""

    name: str
    path: str | None = None
    adapter: str | None = None
    base: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def parse_named(text: str, flag: str, allow_bare: bool = False) -> tuple[str, str]:
    """Split ``NAME=PATH``; with ``allow_bare`` a bare PATH is named after its file stem."""
    if "=" in text:
        name, value = text.split("=", 1)
    elif allow_bare:
        value = text
        name = Path(text).stem
    else:
        raise EvalInputError(f"{flag} {text!r}: expected NAME=PATH")
    if not NAME_RE.match(name):
        raise EvalInputError(f"{flag} {text!r}: name {name!r} must be letters, digits, '.', '_' or '-'")
    if not value:
        raise EvalInputError(f"{flag} {text!r}: empty path")
    return name, value


def ensure_writable_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` if needed and check that files can be written there.

    Raises :class:`EvalInputError` naming the directory and the flag that sets it,
    so an unusable directory stops the run before any model is loaded.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise EvalInputError(f"{path}: cannot write there ({e.strerror or e}); choose another {flag}") from None
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def merge_key(adapter_dir: str | Path, base: str, dtype: str) -> dict[str, Any]:
    """What a merged model depends on: the adapter's bytes, the base and the dtype."""
    return {
        "adapter_sha256": dir_content_sha256(adapter_dir),
        "base": str(base),
        "base_fingerprint": model_dir_fingerprint(base),
        "dtype": dtype,
    }


def _load_base_for_merge(base: str, dtype: str, device_map: str | None) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    quant = getattr(AutoConfig.from_pretrained(base), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method).lower().endswith("mxfp4"):
        # gpt-oss ships MXFP4 experts: dequantize so the merged model is plain bf16.
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(base, **kwargs)


def non_integer_labels(problems: list[Problem], scorer: Any) -> list[Problem]:
    """Problems whose label the reward does not read as a whole number (it grades integers).

    The reward normalizes the label as it normalizes an answer (``90^\\circ`` and ``x = 5`` are
    integers), so only labels it would compare as text or decimals are listed.
    """
    return [p for p in problems if not INTEGER_RE.fullmatch(scorer.normalize_answer(p.label))]


def _work_dir_name(name: str, kind: str) -> str:
    return f".{safe_name(name)}.{kind}-{os.getpid()}@{safe_name(socket.gethostname())}"


def clean_stale_merges(merged_root: str | Path) -> list[Path]:
    """Remove the temporary folders of merges whose process is gone; return what was removed.

    A merge writes a whole model (about 40 GB for gpt-oss-20b) into ``.NAME.merging-PID@HOST``
    before renaming it into place; a SIGKILL leaves that folder behind. One whose PID no
    longer runs on this host is removed. A folder of another host (a --merged-dir on shared
    storage) or of a live process is left alone.
    """
    root = Path(merged_root)
    here = safe_name(socket.gethostname())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = WORK_DIR_RE.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        if (m.group("host") or here) != here or pid_running(int(m.group("pid"))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            print(f"[merge] removed {entry}: left by an interrupted merge (process {m.group('pid')} is gone)")
            removed.append(entry)
    return removed


def merge_is_cached(name: str, merged_root: str | Path, key: dict[str, Any]) -> bool:
    """True when ``merged_root/NAME`` holds a merge made with ``key``; no merge is then needed.

    A directory there without a merge record was not made by this tool:
    :class:`EvalInputError`, so it is never overwritten.
    """
    target = Path(merged_root) / safe_name(name)
    if not target.exists():
        return False
    record_path = target / MERGE_RECORD
    if not record_path.is_file():
        raise EvalInputError(
            f"{target}: exists but was not made by eval_posthoc.py (no {MERGE_RECORD}); "
            "remove it or choose another --merged-dir"
        )
    return json.loads(record_path.read_text()).get("key") == key


def merge_adapter(
    name: str,
    adapter_dir: str | Path,
    base: str,
    merged_root: str | Path,
    dtype: str = "bfloat16",
    device_map: str | None = "cpu",
    key: dict[str, Any] | None = None,
) -> tuple[Path, bool]:
    """Merge a LoRA adapter into ``base`` under ``merged_root/NAME``; reuse it while unchanged.

    The directory holds a merge record (``rft_merge.json``) with the adapter's
    content hash, the base and the dtype. An identical record means the merged
    model is reused; a different one means the adapter (or base) changed, and the
    model is merged again into a temporary directory that then replaces the old
    one. A directory without a record was not made here and is never touched.

    Returns the merged model's path and whether a merge ran.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvalInputError(f"{adapter_dir}: no adapter_config.json; --adapter needs a PEFT LoRA adapter directory")
    key = key or merge_key(adapter_dir, base, dtype)
    root = Path(merged_root)
    target = root / safe_name(name)
    if target.exists():
        if merge_is_cached(name, merged_root, key):
            print(f"[merge] {name}: reusing {target} (adapter unchanged)")
            return target, False
        print(f"[merge] {name}: adapter or base changed since {target} was merged; merging again")

    import peft
    from transformers import AutoTokenizer

    ensure_writable_dir(root, "--merged-dir")
    clean_stale_merges(root)
    tmp = root / _work_dir_name(name, "merging")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[merge] {name}: merging {adapter_dir} into {base} ({dtype})")
    try:
        try:
            model = _load_base_for_merge(base, dtype, device_map)
        except (OSError, ValueError) as e:
            raise EvalInputError(
                f"--base {base}: cannot load the base model ({_first_line(e)}); pass the model the adapter was trained on "
                "(a local directory or a hub id)"
            ) from None
        try:
            model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            raise EvalInputError(
                f"{adapter_dir}: the adapter does not load into {base} ({_first_line(e)}); check that --base is its base model"
            ) from None
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        # The tokenizer of the base, as training loads it from the pretrained path.
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        record = {
            "key": key,
            "adapter": str(adapter_dir.resolve()),
            "merged_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(tmp / MERGE_RECORD, json.dumps(record, indent=2) + "\n")
        if target.exists():
            old = root / _work_dir_name(name, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def model_identity(spec: ModelSpec, merge_dtype: str) -> dict[str, Any]:
    """What the samples of a model depend on, without loading or merging it."""
    if spec.adapter:
        return {"kind": "adapter", **merge_key(spec.adapter, spec.base or "", merge_dtype)}
    return {"kind": "model", "path": spec.path, "fingerprint": model_dir_fingerprint(spec.path or "")}


# --------------------------------------------------------------------------- generation


@dataclass
class Task:
    """The samples of one (model, dataset, mode) and the file they go to."""

    model: str
    dataset: str
    mode: Mode
    problems: list[Problem]
    store: SampleStore
    settings: dict[str, Any]
    done: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    def todo(self) -> list[tuple[int, int]]:
        return [
            (p.index, j) for p in self.problems for j in range(self.mode.n) if (p.index, j) not in self.done
        ]


def run_task(
    task: Task,
    backend: Backend,
    tokenizer: Any,
    scorer: Any,
    *,
    max_tokens: int,
    seed: int,
    spec: PromptSpec,
    prompt_max_len: int | None,
    chunk_size: int,
) -> int:
    """Generate, score and append the missing samples of one task; returns how many were written.

    Each chunk is written and flushed before the next starts, so an interrupted
    run keeps every finished chunk.
    """
    todo = task.todo()
    if not todo:
        return 0
    prompts: dict[int, tuple[list[int], str]] = {}
    cut = 0
    for p in task.problems:
        text = build_prompt(tokenizer, p.input, spec)
        ids, was_cut = prompt_token_ids(tokenizer, text, prompt_max_len)
        cut += was_cut
        prompts[p.index] = (ids, hashlib.sha256(text.encode()).hexdigest()[:16])
    if cut:
        print(f"[{task.model}] {task.dataset}: {cut} prompts longer than --prompt-max-len {prompt_max_len} keep their last tokens")
    labels = {p.index: p.label for p in task.problems}
    written = 0
    desc = f"{task.model} | {task.dataset} | {task.mode.name}"
    with tqdm(total=len(todo), desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk_size):
            keys = todo[start : start + chunk_size]
            requests = [
                GenRequest(
                    prompt_ids=prompts[i][0],
                    temperature=task.mode.temperature,
                    top_p=task.mode.top_p,
                    max_tokens=max_tokens,
                    seed=sample_seed(seed, i, j),
                )
                for i, j in keys
            ]
            results = backend.generate(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
            records = [
                make_record(task, i, j, req, res, tokenizer, scorer, labels[i], prompts[i][1], spec.digest())
                for (i, j), req, res in zip(keys, requests, results)
            ]
            task.store.append(records)
            for rec in records:
                task.done[(rec["problem"], rec["sample"])] = rec
            written += len(records)
            bar.update(len(records))
    return written


def make_record(
    task: Task, problem: int, sample: int, req: GenRequest, res: GenResult, tokenizer: Any, scorer: Any, label: str,
    prompt_hash: str, spec_digest: str,
) -> dict[str, Any]:
    """One JSONL line: where the sample belongs, what was generated and how it scored."""
    # Special tokens kept, as the training reward sees the rollout (Harmony channels included).
    response = tokenizer.decode(res.token_ids, skip_special_tokens=False)
    return {
        "model": task.model,
        "dataset": task.dataset,
        "mode": task.mode.name,
        "problem": problem,
        "sample": sample,
        "label": label,
        "seed": req.seed if req.temperature > 0 else None,
        "prompt_sha256": prompt_hash,
        "prompt_spec": spec_digest,
        "prompt_tokens": len(req.prompt_ids),
        "response": response,
        "response_tokens": len(res.token_ids),
        "finish_reason": res.finish_reason,
        **score_sample(scorer, response, label),
    }


# --------------------------------------------------------------------------- metrics


def task_metrics(
    task: Task, scorer: Any, n_resamples: int = 10_000, level: float = 0.95
) -> tuple[dict[str, Any], dict[int, float]]:
    """Metrics of one (model, dataset, mode) and its per-problem accuracies.

    Every stored response is scored again with the current ``reward_func_em``, so
    the summary always matches today's extraction; samples whose score changed
    since generation are counted in ``rescored_changed``. Only problems with all
    n samples count; ``n_problems`` and ``n_incomplete`` say how many.
    """
    n = task.mode.n
    by_problem: dict[int, list[dict[str, Any]]] = {}
    changed = 0
    for (i, _j), rec in sorted(task.done.items()):
        fresh = score_sample(scorer, rec["response"], rec["label"])
        changed += fresh["correct"] != rec.get("correct")
        by_problem.setdefault(i, []).append({**rec, **fresh})
    complete = {i: recs for i, recs in by_problem.items() if len(recs) == n}
    digests = sorted({rec.get("prompt_spec") or "unrecorded" for rec in task.done.values()})
    base = {
        "model": task.model,
        "dataset": task.dataset,
        "dataset_sha256": task.settings["dataset_sha256"],
        "mode": task.mode.name,
        "temperature": task.mode.temperature,
        "top_p": task.mode.top_p,
        "n_samples": n,
        "k": list(range(1, n + 1)),
        "reasoning_effort": task.settings["reasoning_effort"],
        "prompt_date": task.settings["prompt_date"],
        "max_tokens": task.settings["max_tokens"],
        "prompt_spec": digests[0] if len(digests) == 1 else digests,
        "differs_from_run": task.settings["differs_from_run"],
        "n_problems": len(complete),
        "n_dataset_problems": len(task.problems),
        "n_incomplete": len(task.problems) - len(complete),
        "settings": task.settings,
        "samples_file": str(task.store.path),
    }
    if not complete:
        return {**base, "pass@1": None, f"avg@{n}": None, "truncation_rate": None}, {}
    counts = [(n, sum(r["correct"] for r in recs)) for recs in complete.values()]
    per_problem = {i: c / n for i, (_, c) in zip(complete, counts)}
    scores = list(per_problem.values())
    samples = [r for recs in complete.values() for r in recs]
    lo, hi = eval_stats.bootstrap_mean_ci(scores, level=level, n_resamples=n_resamples)
    metrics = {
        **base,
        "pass@1": eval_stats.mean_pass_at_k(counts, 1),
        "pass@1_ci95": [lo, hi],
        f"avg@{n}": sum(scores) / len(scores),
        f"avg@{n}_ci95": [lo, hi],
        "pass@k": {str(k): eval_stats.mean_pass_at_k(counts, k) for k in range(1, n + 1)},
        f"maj@{n}": (
            sum(eval_stats.majority_vote_score([r["pred_norm"] for r in recs], [r["correct"] for r in recs]) for recs in complete.values())
            / len(complete)
        ),
        "has_answer_rate": _mean(r["score"]["has_answer"] if r["score"] else 0.0 for r in samples),
        "has_boxed_rate": _mean(r["score"]["has_boxed"] if r["score"] else 0.0 for r in samples),
        "has_final_channel_rate": _mean(r["score"].get("has_final_channel", 0.0) if r["score"] else 0.0 for r in samples),
        "truncation_rate": _mean(float(r["finish_reason"] == "length") for r in samples),
        "mean_response_tokens": _mean(float(r["response_tokens"]) for r in samples),
        "score_errors": sum(r["score_error"] is not None or bool(r["score"] and r["score"].get("reward_error")) for r in samples),
        "rescored_changed": changed,
    }
    return metrics, per_problem


def _mean(values: Any) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def compare(
    model: str, baseline: str, dataset: str, mode: str, acc: dict[int, float], base_acc: dict[int, float], n_resamples: int = 10_000
) -> dict[str, Any]:
    """Paired comparison on the problems both sides finished.

    ``gained``/``lost`` count problems where the model's per-problem accuracy is
    above/below the baseline's. With one sample per problem this is McNemar's
    table and the p-values are McNemar's exact and mid-p tests; with n samples
    they are the exact sign test on per-problem accuracy.
    """
    common = sorted(set(acc) & set(base_acc))
    out: dict[str, Any] = {"model": model, "baseline": baseline, "dataset": dataset, "mode": mode, "n_paired_problems": len(common)}
    if not common:
        return out
    a = [acc[i] for i in common]
    b = [base_acc[i] for i in common]
    cells = eval_stats.paired_outcomes(a, b)
    lo, hi = eval_stats.paired_bootstrap_diff_ci(a, b, n_resamples=n_resamples)
    out.update(cells)
    out.update(
        {
            "delta_pass@1": sum(a) / len(a) - sum(b) / len(b),
            "delta_pass@1_ci95": [lo, hi],
            "mcnemar_p_exact": eval_stats.mcnemar_exact(cells["gained"], cells["lost"]),
            "mcnemar_p_midp": eval_stats.mcnemar_midp(cells["gained"], cells["lost"]),
        }
    )
    return out


# --------------------------------------------------------------------------- reports


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _label(r: dict[str, Any]) -> str:
    """How a row's numbers were made: effort, token budget, prompt spec, and what differs from the run."""
    spec = r["prompt_spec"] if isinstance(r["prompt_spec"], str) else "mixed:" + "+".join(r["prompt_spec"])
    differs = f" (not the run's: {', '.join(r['differs_from_run'])})" if r.get("differs_from_run") else ""
    return f"{r['reasoning_effort']} | {r['max_tokens']} | {spec}{differs}"


def markdown_report(results: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    """Two markdown tables: per-model metrics and paired comparisons against the baseline.

    Every row says how its numbers were made: dataset and its sha256, mode, temperature,
    top-p, n, reasoning effort, max tokens and the prompt spec's digest, with the truncation rate.
    """
    lines = [
        "| model | dataset (sha256) | mode | T | top-p | n | effort | max tokens | prompt spec | problems "
        "| avg@n [95% CI] | pass@n | maj@n | boxed | truncated | mean tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n = r["n_samples"]
        made = (f"| {r['model']} | {r['dataset']} ({r['dataset_sha256'][:12]}) | {r['mode']} | {r['temperature']:g} | "
                f"{r['top_p']:g} | {n} | {_label(r)} | {r['n_problems']}/{r['n_dataset_problems']} |")
        if r["pass@1"] is None:
            lines.append(made + " - | - | - | - | - | - |")
            continue
        lo, hi = r["pass@1_ci95"]
        passn = _pct(r["pass@k"][str(n)]) if n > 1 else "-"
        maj = _pct(r[f"maj@{n}"]) if n > 1 else "-"
        lines.append(
            f"{made} {_pct(r[f'avg@{n}'])} [{100 * lo:.1f}, {100 * hi:.1f}] | {passn} | {maj} | "
            f"{_pct(r['has_boxed_rate'])} | {_pct(r['truncation_rate'])} | {r['mean_response_tokens']:.0f} |"
        )
    lines += [
        "",
        "avg@n: mean over problems of the share of the n samples that are correct (the pass@1 estimate from n "
        "samples), 95% interval by percentile bootstrap over problems; pass@n: unbiased 1 - C(n-c,n)/C(n,n); "
        "maj@n: plurality vote; truncated: share of samples that hit max tokens. Compare rows only when "
        "effort, max tokens and prompt spec agree.",
    ]
    if comparisons:
        lines += [
            "",
            "| model vs baseline | dataset | mode | paired problems | Δavg@n [95% CI] | gained | lost | McNemar p (exact) | mid-p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            if not c["n_paired_problems"]:
                lines.append(f"| {c['model']} vs {c['baseline']} | {c['dataset']} | {c['mode']} | 0 | - | - | - | - | - |")
                continue
            lo, hi = c["delta_pass@1_ci95"]
            lines.append(
                f"| {c['model']} vs {c['baseline']} | {c['dataset']} | {c['mode']} | {c['n_paired_problems']} | "
                f"{100 * c['delta_pass@1']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] | {c['gained']} | {c['lost']} | "
                f"{c['mcnemar_p_exact']:.3g} | {c['mcnemar_p_midp']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def plot_summary(results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of pass@1 with 95% intervals: one panel per (dataset, mode), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["pass@1"] is not None:
            panels.setdefault((r["dataset"], r["mode"]), []).append(r)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 3.5 * len(panels)), 3.6), squeeze=False)
    for ax, ((dataset, mode), rows) in zip(axes[0], sorted(panels.items())):
        ys = [100 * r["pass@1"] for r in rows]
        err = [[100 * (r["pass@1"] - r["pass@1_ci95"][0]) for r in rows], [100 * (r["pass@1_ci95"][1] - r["pass@1"]) for r in rows]]
        ax.bar(range(len(rows)), ys, yerr=err, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("pass@1 (%), 95% bootstrap CI")
        ax.set_title(f"{dataset}\n{mode} (n={rows[0]['n_problems']} problems)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_posthoc.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="merged HF model (local dir or hub id); repeatable")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="LoRA adapter merged into --base; repeatable")
    g.add_argument("--base", help="base model of the adapters (local dir or hub id)")
    g.add_argument("--baseline", metavar="NAME", help="model the others are compared against (paired, per problem)")
    g.add_argument("--tokenizer", help="tokenizer for every model (default: each model's own; a merge saves the base's)")
    g.add_argument("--merged-dir", default="/mnt/scratch/merged_models", help="cache of merged adapters (default: %(default)s)")
    g.add_argument("--merge-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of merged weights (default: %(default)s)")
    g.add_argument("--merge-device-map", default="cpu", help="device_map for loading the base to merge, e.g. cpu or auto (default: %(default)s)")
    g = p.add_argument_group("data and modes")
    g.add_argument("--dataset", action="append", default=[], metavar="[NAME=]PATH", help="JSONL with input/label rows; repeatable (name: file stem)")
    g.add_argument("--input-key", default="input", help="input field of a row, as --input_key in training (default: %(default)s)")
    g.add_argument("--label-key", default="label", help="label field of a row, as --label_key in training (default: %(default)s)")
    g.add_argument("--modes", default="greedy_pass@1", help="comma-separated modes (default: %(default)s); see above")
    g.add_argument("--sampling-temperature", type=float, default=DEFAULT_SAMPLING_TEMPERATURE, help="temperature of sampling_pass@N (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p of sampling_pass@N (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=None, help=f"new tokens per sample, as --generate_max_len (default: the run's with --manifest, else {DEFAULT_MAX_TOKENS})")
    g.add_argument("--prompt-max-len", type=int, default=None, help="keep only the last N prompt tokens, as --prompt_max_len (default: no limit)")
    g.add_argument("--manifest", metavar="RUN_MANIFEST", help=f"the run's {RUN_MANIFEST} (or its folder): prompt spec and token budget as in training")
    g.add_argument("--reasoning-effort", choices=EFFORTS, help=f"gpt-oss reasoning effort in the prompt (default: the run's with --manifest, else {DEFAULT_EFFORT})")
    g.add_argument("--prompt-date", help=f"the prompt's 'Current date' line, YYYY-MM-DD (default: the run's with --manifest, else {DEFAULT_DATE})")
    g.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds (default: %(default)s)")
    g = p.add_argument_group("generation")
    g.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="vllm for GPUs, hf (transformers) for CPU and small checks (default: %(default)s)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM GPU memory fraction (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default: the model's)")
    g.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    g.add_argument("--dtype", default="auto", help="generation dtype (default: %(default)s, the model's)")
    g.add_argument("--hf-device", default="cpu", help="device of the hf backend (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="hf backend batch size (default: %(default)s)")
    g.add_argument("--chunk-size", type=int, default=None, help="samples generated between two writes (default: 512 for vllm, --batch-size for hf)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="eval_results", help="samples/, summary.json, summary.md, summary.png (default: %(default)s)")
    g.add_argument("--bootstrap-resamples", type=int, default=10_000, help="bootstrap resamples for the 95%% intervals (default: %(default)s)")
    g.add_argument("--summary-only", action="store_true", help="generate nothing; summarize the samples already written")
    return p


def parse_models(args: argparse.Namespace) -> list[ModelSpec]:
    """Model specs from --model/--adapter, checked for clashes and a valid --baseline."""
    specs: list[ModelSpec] = []
    for text in args.model:
        name, path = parse_named(text, "--model")
        specs.append(ModelSpec(name=name, path=path))
    for text in args.adapter:
        name, path = parse_named(text, "--adapter")
        if not args.base:
            raise EvalInputError(f"--adapter {text}: needs --base, the model the adapter was trained on")
        if not Path(path).is_dir():
            raise EvalInputError(f"--adapter {text}: {path} is not a directory; pass the adapter's directory")
        specs.append(ModelSpec(name=name, adapter=path, base=args.base))
    if not specs:
        raise EvalInputError("nothing to evaluate; pass --model NAME=PATH and/or --adapter NAME=DIR with --base")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalInputError(f"model names must be unique; repeated: {', '.join(dupes)}")
    if args.baseline and args.baseline not in names:
        raise EvalInputError(f"--baseline {args.baseline}: not among the models ({', '.join(names)})")
    return specs


def load_tokenizer(path: str) -> Any:
    """The tokenizer at ``path``; a missing or broken one is a one-line input error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalInputError(f"{path}: cannot load a tokenizer ({first}); pass a model directory with tokenizer files or --tokenizer") from None


def make_backend(args: argparse.Namespace, model_path: str, tokenizer_path: str, tokenizer: Any) -> Backend:
    """The generation engine selected by --backend."""
    from rft import eval_backends

    if args.backend == "hf":
        return eval_backends.HFBackend(model_path, tokenizer, dtype=args.dtype, device=args.hf_device, batch_size=args.batch_size)
    return eval_backends.VLLMBackend(
        model_path,
        tokenizer_path,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        dtype=args.dtype,
    )


def run(argv: Sequence[str] | None = None, backend_factory: Callable[..., Backend] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary that was written. ``backend_factory`` is for tests."""
    args = build_parser().parse_args(argv)
    prompts = prompt_settings(args, read_manifest(args.manifest) if args.manifest else None)
    for name in prompts.differs_from_run:
        print(f"eval_posthoc.py: note: {name} is {getattr(prompts, name)!r} here, not the run's; "
              "the results are labelled with this eval's value", file=sys.stderr)
    if prompts.max_tokens < 1 or args.batch_size < 1 or (args.chunk_size is not None and args.chunk_size < 1):
        raise EvalInputError("--max-tokens, --batch-size and --chunk-size must be at least 1")
    specs = parse_models(args)
    modes = [parse_mode(m, args.sampling_temperature, args.top_p) for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise EvalInputError("--modes is empty; e.g. --modes greedy_pass@1,sampling_pass@8")
    if len({m.name for m in modes}) != len(modes):
        raise EvalInputError(f"--modes {args.modes}: a mode is listed twice")
    if not args.dataset:
        raise EvalInputError("no --dataset; pass a JSONL file of {input, label} rows")
    datasets: dict[str, tuple[list[Problem], str]] = {}
    scorer = load_scorer()
    for text in args.dataset:
        name, path = parse_named(text, "--dataset", allow_bare=True)
        if name in datasets:
            raise EvalInputError(f"--dataset {text}: the name {name!r} is used twice; name them NAME=PATH")
        datasets[name] = (load_problems(path, args.input_key, args.label_key), file_sha256(path))
        odd = non_integer_labels(datasets[name][0], scorer)
        if odd:
            print(
                f"eval_posthoc.py: warning: {path}: {len(odd)} of {len(datasets[name][0])} labels are not integers "
                f"(first at line {odd[0].line}: {odd[0].label[:40]!r}); the reward grades integer answers, "
                "so these compare as text",
                file=sys.stderr,
            )
    out = ensure_writable_dir(args.output_dir, "--output-dir")
    chunk = args.chunk_size or (args.batch_size if args.backend == "hf" else 512)
    factory = backend_factory or (lambda path, tok_path, tok: make_backend(args, path, tok_path, tok))

    # Read every existing sample file first, so a settings clash stops the run before any work.
    all_tasks: list[Task] = []
    model_info: dict[str, Any] = {}
    tasks_of: dict[str, list[Task]] = {}
    for spec in specs:
        identity = model_identity(spec, args.merge_dtype)
        model_info[spec.name] = identity
        tasks = []
        for ds_name, (problems, ds_hash) in datasets.items():
            for mode in modes:
                settings = {
                    "model": identity,
                    "dataset_sha256": ds_hash,
                    "input_key": args.input_key,
                    "label_key": args.label_key,
                    "mode": mode.name,
                    "temperature": mode.temperature,
                    "top_p": mode.top_p,
                    "n": mode.n,
                    "max_tokens": prompts.max_tokens,
                    "prompt_max_len": args.prompt_max_len,
                    "reasoning_effort": prompts.reasoning_effort,
                    "prompt_date": prompts.prompt_date,
                    "differs_from_run": list(prompts.differs_from_run),
                    "tokenizer": args.tokenizer,
                    "seed": args.seed,
                    "backend": args.backend,
                }
                path = out / "samples" / safe_name(spec.name) / safe_name(ds_name) / f"{safe_name(mode.name)}.jsonl"
                store = SampleStore(path, run_key(settings))
                task = Task(spec.name, ds_name, mode, problems, store, settings)
                task.done = store.load()
                tasks.append(task)
        all_tasks.extend(tasks)
        tasks_of[spec.name] = tasks

    # Folders of merges a kill interrupted hold a partial model each (40 GB for the 20b).
    if any(s.adapter for s in specs) and Path(args.merged_dir).is_dir():
        clean_stale_merges(args.merged_dir)
    # A merge still to make needs a writable --merged-dir: say so before any model is loaded
    # (a read-only cache of finished merges is fine).
    to_merge = [
        s for s in specs
        if s.adapter and not args.summary_only and any(t.todo() for t in tasks_of[s.name])
        and not merge_is_cached(s.name, args.merged_dir, {k: v for k, v in model_info[s.name].items() if k != "kind"})
    ]
    if to_merge:
        ensure_writable_dir(args.merged_dir, "--merged-dir")
    for spec in specs:
        tasks = tasks_of[spec.name]
        identity = model_info[spec.name]
        missing = sum(len(t.todo()) for t in tasks)
        if args.summary_only or not missing:
            print(f"[{spec.name}] nothing to generate ({'--summary-only' if args.summary_only else 'all samples already written'})")
            continue
        model_path = spec.path
        if spec.adapter:
            merged, _ = merge_adapter(
                spec.name, spec.adapter, spec.base or "", args.merged_dir, args.merge_dtype, args.merge_device_map,
                key={k: v for k, v in identity.items() if k != "kind"},
            )
            model_path = str(merged)
        tok_path = args.tokenizer or str(model_path)
        tokenizer = load_tokenizer(tok_path)
        print(f"[{spec.name}] {missing} samples to generate with {args.backend} from {model_path}")
        backend = factory(str(model_path), tok_path, tokenizer)
        try:
            for task in tasks:
                run_task(
                    task, backend, tokenizer, scorer,
                    max_tokens=prompts.max_tokens, seed=args.seed, spec=prompts.spec(tokenizer),
                    prompt_max_len=args.prompt_max_len, chunk_size=chunk,
                )
        finally:
            backend.close()

    results, accs = [], {}
    for task in all_tasks:
        metrics, acc = task_metrics(task, scorer, n_resamples=args.bootstrap_resamples)
        metrics["samples_file"] = os.path.relpath(task.store.path, out)
        results.append(metrics)
        accs[(task.model, task.dataset, task.mode.name)] = acc
        if metrics["n_incomplete"]:
            print(f"[{task.model}] {task.dataset} {task.mode.name}: {metrics['n_incomplete']} problems lack samples; their metrics exclude them")
    comparisons = []
    if args.baseline:
        for task in all_tasks:
            if task.model == args.baseline:
                continue
            key = (task.dataset, task.mode.name)
            comparisons.append(
                compare(task.model, args.baseline, *key, accs[(task.model, *key)], accs[(args.baseline, *key)], n_resamples=args.bootstrap_resamples)
            )
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "backend": args.backend,
        "baseline": args.baseline,
        "models": model_info,
        "datasets": {k: {"sha256": h, "n_problems": len(p)} for k, (p, h) in datasets.items()},
        "prompt": {"reasoning_effort": prompts.reasoning_effort, "prompt_date": prompts.prompt_date,
                   "max_tokens": prompts.max_tokens, "run_template_sha256": prompts.template_sha256,
                   "manifest": args.manifest, "differs_from_run": list(prompts.differs_from_run)},
        "metric_definitions": {
            "pass@1": "mean over problems of (correct samples / n)",
            "avg@n": "the same mean under the field's name: accuracy averaged over the n samples of each problem",
            "prompt_spec": "digest of rft/prompt_spec.py's specification: template sha256, reasoning effort, date",
            "pass@k": "unbiased estimator 1 - C(n-c,k)/C(n,k), mean over problems",
            "maj@n": "plurality vote over normalized extracted answers; ties share credit equally; no answer earns 0",
            "pass@1_ci95": "percentile bootstrap over problems",
            "truncation_rate": "fraction of samples that hit --max-tokens",
            "mcnemar": "exact and mid-p on problems gained/lost vs the baseline (sign test on per-problem accuracy when n > 1)",
        },
        "results": results,
        "comparisons": comparisons,
    }
    report = markdown_report(results, comparisons)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", report)
    plot_summary(results, out / "summary.png")
    print()
    print(report)
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'summary.png'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the summary is written, 2 on bad input (one line naming the file or flag)."""
    try:
        run(argv)
    except EvalInputError as e:
        print(f"eval_posthoc.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the checks above did not reach (an adapter, a cache): still one line
        where = e.filename or "a file"
        print(f"eval_posthoc.py: error: {where}: {e.strerror or e}; check that path and its permissions", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
