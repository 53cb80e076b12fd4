"""Filters, splits and writes the training and evaluation data of rft.

The pipeline turns a NuminaMath-1.5-shaped source (columns ``problem``,
``solution``, ``answer``, ``question_type``, ``source``, ``problem_is_valid``,
``solution_is_valid``) into the JSONL files OpenRLHF reads with
``--input_key input --label_key label``. It reads the source once, in Arrow
record batches, and applies these stages in order; every stage reports how many
rows remain and why the others left:

1. ``well_formed``: every required field present and a string.
2. ``math_word_problem``: ``question_type == "math-word-problem"``.
3. ``integer_answer``: the answer is a clean integer (see ``parse_integer_answer``).
4. ``not_amc_aime``: the source name does not contain ``amc``/``aime`` and the
   problem text does not name the AIME, AMC or AHSME competitions.
5. ``valid_flags``: ``problem_is_valid`` and ``solution_is_valid`` are ``Yes``.
6. ``dedup``: one row per MD5 of the whitespace-normalized problem; a problem
   whose copies disagree on the answer is dropped entirely.
7. ``quality``: problems of at least ``min_problem_chars`` characters, non-empty
   solutions.
8. ``not_in_eval_sets``: problems of the OOD and AIME evaluation sets never
   reach training.

Splits are assigned by sorting the remaining problems on
``sha256(seed:problem_hash)``, so a problem's split depends only on its text and
the seed, never on the order or the other rows of the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import reward_func_em
from rft.eval_io import file_sha256
from rft.patching import pid_running, signals_held

REQUIRED_COLUMNS = (
    "problem",
    "solution",
    "answer",
    "question_type",
    "source",
    "problem_is_valid",
    "solution_is_valid",
)
WORD_PROBLEM = "math-word-problem"
BATCH_ROWS = 65_536
MAX_REASON_KEYS = 25
DEFAULT_HUB_SOURCE = "AI-MO/NuminaMath-1.5"
DEFAULT_OOD_SOURCE = "HuggingFaceH4/MATH-500"
DEFAULT_AIME_SOURCE = "HuggingFaceH4/aime_2024"
REPORT_SCHEMA = 1

OUT_POOL = "sft_rl_pool.jsonl"
OUT_POOL_SUBSET = "sft_rl_pool_400.jsonl"
OUT_SFT_TRAIN = "sft_train.jsonl"
OUT_SFT_DEV = "sft_dev.jsonl"
OUT_PROBE_ID = "probe_set_200.jsonl"
OUT_PROBE_OOD = "probe_set_200_ood.jsonl"
OUT_AIME = "aime_eval.jsonl"
OUT_REPORT = "prep_report.json"
OUT_TIMING = "prep_timing.json"
OUT_PLOT = "prep_funnel.png"
REQUIRED_OUTPUTS = (OUT_POOL, OUT_POOL_SUBSET, OUT_SFT_TRAIN, OUT_SFT_DEV, OUT_PROBE_ID)
"""Written by every run; the eval sets are skipped when their source is 'none'."""
ALL_OUTPUTS = (
    OUT_POOL,
    OUT_POOL_SUBSET,
    OUT_SFT_TRAIN,
    OUT_SFT_DEV,
    OUT_PROBE_ID,
    OUT_PROBE_OOD,
    OUT_AIME,
)

# An integer: optional sign (ASCII or U+2212 minus), then ASCII digits, plain or in
# groups of three separated by ",", "{,}" or "\," (LaTeX thin space).
_INTEGER_RE = re.compile(r"([+\-\u2212]?)(\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+|\d+)", re.ASCII)
_PLAIN_INTEGER_RE = re.compile(r"-?\d{1,64}", re.ASCII)
_SEPARATOR_RE = re.compile(r",|\{,\}|\\,")
_DECIMAL_RE = re.compile(r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d*)\.\d+", re.ASCII)
_SOURCE_AMC_AIME_RE = r"(?i)amc|aime"
# Competition names in problem text: the acronyms as words (also "AMC10",
# "AMC 12", "AIMEs"), and the spelled-out names. RE2 (pyarrow) and Python re agree.
PROBLEM_AMC_AIME_RE = (
    r"\b(?:AIME|AMC|AHSME)(?:s?\b|\d)"
    r"|(?i:american\s+invitational\s+mathematics\s+exam"
    r"|american\s+mathematics\s+competition"
    r"|american\s+high\s+school\s+mathematics\s+exam)"
)
# What may follow the last box of an SFT solution: closing math delimiters and a period.
_BOX_TAIL_RE = re.compile(r"(?:\s|\$|\.|\\\]|\\\)|\\end\{[a-zA-Z*]+\})*")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")
_MAX_UNWRAP = 8
_WORD_SEPARATOR_RE = re.compile(r"\s(?:or|and)\s|\\text\{\s*(?:or|and)\s*\}")
_WRAPPER_STARTS = ("$", "\\(", "\\[", "\\boxed{")


class PrepError(Exception):
    """A problem with the user's input or arguments: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_at``, or -1 when unbalanced.

    >>> _closing_brace("{a{b}c}d", 0)
    6
    >>> _closing_brace("{a", 0)
    -1
    """
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def unwrap_answer(text: str) -> str:
    """Strip the wrappers an answer may carry: spaces, ``$…$``, ``\\(…\\)``, ``\\[…\\]``, ``\\boxed{…}``.

    >>> unwrap_answer("  $\\\\boxed{1,000}$ ")
    '1,000'
    >>> unwrap_answer("\\\\boxed{1}+\\\\boxed{2}")
    '\\\\boxed{1}+\\\\boxed{2}'
    """
    if not text.startswith(_WRAPPER_STARTS) and not text[-1:].isspace() and not text[:1].isspace():
        return text
    for _ in range(_MAX_UNWRAP):
        before = text
        text = text.strip()
        if len(text) >= 4 and text.startswith("$$") and text.endswith("$$"):
            text = text[2:-2]
        elif len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text[1:-1]
        elif text.startswith(("\\(", "\\[")) and text.endswith(("\\)", "\\]")) and len(text) >= 4:
            text = text[2:-2]
        elif text.startswith("\\boxed{") and text.endswith("}"):
            if _closing_brace(text, len("\\boxed")) == len(text) - 1:
                text = text[len("\\boxed{") : -1]
        if text == before:
            break
    return text.strip()


def canonical_integer(core: str) -> str | None:
    """The canonical form of an unwrapped integer string, or None when it is not one.

    Canonical: no separators, no leading zeros (``0`` stays), ``-`` kept, ``+`` dropped.

    >>> canonical_integer("1{,}000")
    '1000'
    >>> canonical_integer("-007")
    '-7'
    >>> canonical_integer("\\u22120") is None, canonical_integer("-0")
    (False, '0')
    >>> canonical_integer("1,00") is None
    True
    """
    match = _INTEGER_RE.fullmatch(core)
    if match is None:
        return None
    sign, digits = match.groups()
    digits = _SEPARATOR_RE.sub("", digits).lstrip("0") or "0"
    if digits == "0" or sign in ("", "+"):
        return digits
    return "-" + digits


def parse_integer_answer(text: str) -> str | None:
    """The canonical integer label of a dataset answer, or None when it is not a clean integer.

    Accepted: optional sign, digits, optional thousands separators, surrounded by any
    of spaces, ``$``, ``\\(…\\)``, ``\\[…\\]`` and ``\\boxed{}``. Rejected: fractions,
    decimals, expressions, units, several answers and empty answers.

    >>> parse_integer_answer("\\\\boxed{1,000}")
    '1000'
    >>> parse_integer_answer("$-42$")
    '-42'
    >>> [parse_integer_answer(x) for x in ["\\\\frac{1}{2}", "2.5", "1, 2", ""]]
    [None, None, None, None]

    Forms the reward grades as integers are integers here too (one grammar):

    >>> [parse_integer_answer(x) for x in ["90^\\\\circ", "x=5", "\\\\$36"]]
    ['90', '5', '36']
    """
    if text.isdigit() and text.isascii():  # the common case, without a regex
        return text.lstrip("0") or "0"
    return canonical_integer(unwrap_answer(text)) or integer_by_reward(text)


def integer_by_reward(text: str) -> str | None:
    """The integer the reward reads in ``text`` (degrees, units, ``x=``, dollars), or None.

    The data filter keeps exactly the answers the reward can grade as integers: a label the
    filter dropped but the reward would grade is a lost problem; one it kept but the reward
    could not read would score every sample 0.
    """
    normalized = reward_func_em.normalize_answer(text)
    return canonical_integer(normalized) if _PLAIN_INTEGER_RE.fullmatch(normalized) else None


def classify_answer(text: str) -> tuple[str | None, str]:
    """``(label, "")`` for a clean integer answer, else ``(None, rejection reason)``; one unwrap."""
    if text.isdigit() and text.isascii():
        return text.lstrip("0") or "0", ""
    core = unwrap_answer(text)
    label = canonical_integer(core) or integer_by_reward(text)
    return (label, "") if label is not None else (None, _core_rejection_reason(core))


def answer_rejection_reason(text: str) -> str:
    """Why ``parse_integer_answer`` refused an answer, as a short report key.

    >>> [answer_rejection_reason(x) for x in ["", "proof", "2.5", "1, 2", "\\\\frac{1}{2}", "x^2"]]
    ['empty', 'proof/notfound', 'decimal', 'several answers', 'fraction', 'expression or other']
    """
    return _core_rejection_reason(unwrap_answer(text))


def _core_rejection_reason(core: str) -> str:
    if not core:
        return "empty"
    if core.lower() in ("proof", "notfound", "not found", "none", "n/a"):
        return "proof/notfound"
    if _DECIMAL_RE.fullmatch(core):
        return "decimal"
    if _top_level_separator(core):
        return "several answers"
    if "\\frac" in core or "\\dfrac" in core or "\\tfrac" in core or "/" in core:
        return "fraction"
    return "expression or other"


def _top_level_separator(text: str) -> bool:
    """True when a ``,`` or ``;`` or the word ``or``/``and`` separates answers outside braces."""
    if "," in text or ";" in text:
        if "{" not in text:
            return True
        depth = 0
        for ch in text:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch in ",;" and depth == 0:
                return True
    return _WORD_SEPARATOR_RE.search(text) is not None


# --------------------------------------------------------------------------------------
# Problems and solutions
# --------------------------------------------------------------------------------------


def normalize_problem(text: str) -> str:
    """The problem text as deduplication sees it: whitespace runs collapsed, ends stripped.

    >>> normalize_problem("  Find\\n the  sum.\\t")
    'Find the sum.'
    """
    return " ".join(text.split())


def problem_hash(text: str) -> str:
    """MD5 hex digest of the normalized problem text (UTF-8).

    >>> problem_hash("a  b") == problem_hash(" a b ")
    True
    """
    return hashlib.md5(normalize_problem(text).encode("utf-8")).hexdigest()


def mentions_amc_aime(problem: str) -> bool:
    """True when the problem text names the AIME, AMC or AHSME competitions.

    >>> mentions_amc_aime("(AIME 2019) Find n."), mentions_amc_aime("From AMC10A."), mentions_amc_aime("He aimed well.")
    (True, True, False)
    """
    return re.search(PROBLEM_AMC_AIME_RE, problem) is not None


def last_boxed(text: str) -> tuple[str, int] | None:
    """Content of the last ``\\boxed{…}`` with balanced braces, and the index just after it.

    >>> last_boxed("so $\\\\boxed{\\\\frac{1}{2}}$.")
    ('\\\\frac{1}{2}', 23)
    >>> last_boxed("no box") is None
    True
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    open_at = start + len("\\boxed")
    close = _closing_brace(text, open_at)
    if close < 0:
        return None
    return text[open_at + 1 : close], close + 1


def sft_output(solution: str, label: str) -> str | None:
    """The solution as an SFT target when it ends in ``\\boxed{label}``, else None.

    Ending means: the last box holds the label (as a clean integer) and only spaces,
    ``$``, ``.``, ``\\]``, ``\\)`` or ``\\end{…}`` follow it.

    >>> sft_output("Thus $\\\\boxed{1,000}$.\\n", "1000")
    'Thus $\\\\boxed{1,000}$.'
    >>> sft_output("Thus $\\\\boxed{7}$. Check: 7 works.", "7") is None
    True
    """
    return sft_target(solution, label)[0]


def sft_target(solution: str, label: str) -> tuple[str | None, str]:
    """``(output, "")`` as ``sft_output`` gives it, or ``(None, why the solution is not usable)``.

    >>> sft_target("The answer is 7.", "7")
    (None, 'no \\\\boxed{} in the solution')
    """
    box = last_boxed(solution)
    if box is None:
        return None, "no \\boxed{} in the solution"
    content, end = box
    if parse_integer_answer(content) != label:
        return None, "last \\boxed{} is not the label"
    if _BOX_TAIL_RE.fullmatch(solution, end) is None:
        return None, "text follows the last \\boxed{}"
    return solution.rstrip(), ""


def split_key(seed: int, digest: str) -> str:
    """Sort key deciding the split of a problem: sha256 of ``"<seed>:<problem hash>"``."""
    return hashlib.sha256(f"{seed}:{digest}".encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------
# Stage accounting
# --------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Rows that entered and left one filter stage, with reasons and time spent."""

    name: str
    entered: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    @property
    def remaining(self) -> int:
        return self.entered - self.dropped

    def to_report(self) -> dict[str, Any]:
        """Counts as the report stores them; reasons sorted by count, the tail folded into 'other'."""
        ordered = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        reasons = dict(ordered[:MAX_REASON_KEYS])
        rest = sum(count for _, count in ordered[MAX_REASON_KEYS:])
        if rest:
            reasons["(other reasons)"] = reasons.get("(other reasons)", 0) + rest
        return {"name": self.name, "remaining": self.remaining, "dropped": self.dropped, "reasons": reasons}


class Timer:
    """Adds the wall time of a ``with`` block to a stage."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.seconds += time.perf_counter() - self.start


def _reason_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------


@dataclass
class SourceInfo:
    """Where rows came from, for the report."""

    spec: str
    kind: str
    rows: int | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    hub: dict[str, Any] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "kind": self.kind, "rows": self.rows}
        if self.files:
            out["files"] = self.files
        if self.hub:
            out["hub"] = self.hub
        return out


def resolve_files(spec: str, suffixes: tuple[str, ...] = (".parquet", ".jsonl"),
                  wanted: str = "NuminaMath-1.5 parquet shards") -> list[Path] | None:
    """Local files named by a source spec (a file or a folder of them), or None for a hub id."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
        if not files:
            raise PrepError(f"{spec}: folder holds no {' or '.join(suffixes)} file; point at {wanted}")
        return files
    if path.is_file():
        if path.suffix not in suffixes:
            raise PrepError(f"{spec}: unsupported file type {path.suffix!r}; give a {' or '.join(suffixes)} file")
        return [path]
    looks_like_file = spec.startswith((".", "/", "~")) or spec.endswith((".parquet", ".jsonl", ".json"))
    if _HUB_ID_RE.fullmatch(spec) and not looks_like_file:
        return None
    raise PrepError(f"{spec}: no such file or folder (and not a hub dataset id like AI-MO/NuminaMath-1.5)")


def _jsonl_to_table(lines: Sequence[bytes], columns: Sequence[str], malformed_column: str) -> Any:
    """Arrow table of the string columns of JSONL lines; bad rows get a reason in ``malformed_column``."""
    import pyarrow as pa

    values: dict[str, list[str | None]] = {name: [] for name in columns}
    reasons: list[str | None] = []
    for line in lines:
        reason = None
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            row, reason = None, "line is not valid JSON"
        if row is not None and not isinstance(row, dict):
            row, reason = None, "line is not a JSON object"
        for name in columns:
            value = None if row is None else row.get(name)
            if isinstance(value, str):
                values[name].append(value)
                continue
            values[name].append(None)
            if reason is None:
                if row is None or name not in row or value is None:
                    reason = f"missing {name}"
                else:
                    reason = f"{name} is {type(value).__name__}, not a string"
        reasons.append(reason)
    arrays = {name: pa.array(values[name], type=pa.string()) for name in columns}
    arrays[malformed_column] = pa.array(reasons, type=pa.string())
    return pa.table(arrays)


def iter_jsonl_tables(path: Path, columns: Sequence[str], malformed_column: str) -> Iterator[Any]:
    """Arrow tables of up to BATCH_ROWS JSONL lines each (blank lines skipped)."""
    batch: list[bytes] = []
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            batch.append(line)
            if len(batch) == BATCH_ROWS:
                yield _jsonl_to_table(batch, columns, malformed_column)
                batch = []
    if batch:
        yield _jsonl_to_table(batch, columns, malformed_column)


def _with_malformed(table: Any, columns: Sequence[str], malformed_column: str, origin: str) -> Any:
    """Add the malformed-reason column to a parquet/hub batch: null fields and non-string columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise PrepError(
            f"{origin}: no column(s) {', '.join(missing)} (has {', '.join(table.column_names)}); "
            "give a NuminaMath-1.5-shaped source"
        )
    reason = pa.nulls(table.num_rows, type=pa.string())
    arrays = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):  # e.g. parquet written from pandas categoricals
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
            reason = pc.if_else(pc.and_(pc.is_null(reason), pc.is_null(col)), f"missing {name}", reason)
        else:
            bad = pa.array([f"{name} is {col.type}, not a string"] * table.num_rows, type=pa.string())
            reason = pc.coalesce(reason, bad)
            col = pa.nulls(table.num_rows, type=pa.string())
        arrays[name] = col
    arrays[malformed_column] = reason
    return pa.table(arrays)


def open_source(
    spec: str, columns: Sequence[str], malformed_column: str, split: str | None = None, revision: str | None = None
) -> tuple[SourceInfo, Iterator[Any]]:
    """Provenance and a batch iterator for a local file/folder or a hub dataset id.

    Each batch is an Arrow table with ``columns`` as strings (null where absent) and
    ``malformed_column`` holding the reason a row is malformed, or null.
    """
    files = resolve_files(spec)
    if files is None:
        return _open_hub(spec, columns, malformed_column, split, revision)
    info = SourceInfo(spec=spec, kind="files")
    total = 0
    for path in files:
        entry = {"name": path.name, "bytes": path.stat().st_size, "sha256": _readable_sha256(path)}
        if path.suffix == ".jsonl":
            _check_jsonl_columns(path, columns)
        if path.suffix == ".parquet":
            total_rows = _parquet_rows(path)
            entry["rows"] = total_rows
            total += total_rows
        info.files.append(entry)
    info.rows = total if all(p.suffix == ".parquet" for p in files) else None
    return info, _iter_files(files, columns, malformed_column)


def _readable_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise PrepError(f"{path}: cannot read it ({exc.strerror or exc}); check its permissions") from None


def _check_jsonl_columns(path: Path, columns: Sequence[str]) -> None:
    """Refuse a JSONL file whose first object lacks a required column, naming the columns."""
    with open(path, "rb") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                missing = [name for name in columns if name not in row]
                if missing:
                    raise PrepError(f"{path}: rows lack the column(s) {', '.join(missing)} (first row has "
                                    f"{', '.join(sorted(row)) or 'none'}); give a NuminaMath-1.5-shaped source")
                return


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise PrepError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc


def _iter_files(files: Sequence[Path], columns: Sequence[str], malformed_column: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        if path.suffix != ".parquet":
            yield from iter_jsonl_tables(path, columns, malformed_column)
            continue
        try:
            handle = pq.ParquetFile(path)
            present = [c for c in columns if c in handle.schema_arrow.names]
            for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=present):
                yield _with_malformed(pa.Table.from_batches([batch]), columns, malformed_column, str(path))
        except PrepError:
            raise
        except Exception as exc:
            raise PrepError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from exc


def load_hub(spec: str, split: str | None, revision: str | None, fix: str) -> tuple[SourceInfo, Any]:
    """A hub dataset (``name[:split]``) and its provenance; a dataset of several splits must name one
    unless it has a ``test`` split. ``fix`` ends the one-line error when loading fails."""
    import datasets

    name, _, split_in_spec = spec.partition(":")
    split = split_in_spec or split
    try:
        loaded = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:
        raise PrepError(f"{spec}: cannot load from the Hugging Face hub ({type(exc).__name__}: {exc}); {fix}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded.keys())
        pick = names[0] if len(names) == 1 else ("test" if "test" in names else None)
        if pick is None:
            raise PrepError(f"{spec}: has splits {', '.join(names)}; name one as {name}:SPLIT")
        loaded, split = loaded[pick], pick
    info = SourceInfo(spec=spec, kind="hub", rows=len(loaded))
    info.hub = {"name": name, "split": split, "revision": revision, "fingerprint": loaded._fingerprint}
    return info, loaded


def _open_hub(
    spec: str, columns: Sequence[str], malformed_column: str, split: str | None, revision: str | None
) -> tuple[SourceInfo, Iterator[Any]]:
    """Load a hub dataset through ``datasets.load_dataset`` and iterate it in Arrow batches."""
    info, loaded = load_hub(spec, split, revision, "check the name and network, or pass a local parquet/JSONL path")

    def batches() -> Iterator[Any]:
        for table in loaded.with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield _with_malformed(table, columns, malformed_column, spec)

    return info, batches()


# --------------------------------------------------------------------------------------
# The main filter pass
# --------------------------------------------------------------------------------------

MALFORMED = "__malformed__"
_SHORT_COLUMNS = ("question_type", "answer", "source", "problem_is_valid", "solution_is_valid")
STAGE_NAMES = (
    "well_formed",
    "math_word_problem",
    "integer_answer",
    "not_amc_aime",
    "valid_flags",
    "dedup",
    "quality",
    "not_in_eval_sets",
)


@dataclass
class Candidate:
    """A problem that passed every filter."""

    problem: str
    solution: str
    label: str
    digest: str
    normalized_chars: int = 0


@dataclass
class FilterResult:
    """The pass's survivors (in source order) and the accounting of every stage."""

    candidates: list[Candidate]
    stages: list[Stage]
    rows_read: int
    read_seconds: float


def _drop_counts(stage: Stage, values: Any, keep: Any, prefix: str) -> None:
    """Count the dropped rows of a vectorized stage by their value of one column."""
    import pyarrow.compute as pc

    dropped = values.filter(pc.invert(keep))
    if len(dropped) == 0:
        return
    for entry in pc.value_counts(dropped).to_pylist():
        value = entry["values"]
        key = f"{prefix}{_reason_value(value) if value is not None else '(null)'}"
        stage.reasons[key] += entry["counts"]


def filter_rows(
    batches: Iterable[Any],
    min_problem_chars: int,
    eval_digests: dict[str, str],
    progress: Callable[[int], None] | None = None,
) -> FilterResult:
    """Run stages 1-8 over Arrow batches in one pass; keep survivors' text and labels.

    ``eval_digests`` maps a problem hash of an evaluation set to that set's name.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    stages = {name: Stage(name) for name in STAGE_NAMES}
    kept: list[tuple[str, str, str]] = []
    rows_read = 0
    read_seconds = 0.0
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        table = next(iterator, None)
        read_seconds += time.perf_counter() - start
        if table is None:
            break
        rows_read += table.num_rows

        # The cheap stages run on the short columns, with each row's position kept, so the long
        # problem and solution texts are copied once, for the rows that reach the text check.
        st = stages["well_formed"]
        with Timer(st):
            st.entered += table.num_rows
            malformed = table.column(MALFORMED)
            keep = pc.is_null(malformed)
            for entry in pc.value_counts(malformed.filter(pc.invert(keep))).to_pylist():
                st.reasons[entry["values"]] += entry["counts"]
            small = table.select(list(_SHORT_COLUMNS)).append_column(
                "__row__", pa.array(range(table.num_rows), pa.int64())
            )
            small = small.filter(keep)

        st = stages["math_word_problem"]
        with Timer(st):
            st.entered += small.num_rows
            qtype = small.column("question_type")
            keep = pc.equal(qtype, WORD_PROBLEM)
            _drop_counts(st, qtype, keep, "question_type=")
            small = small.filter(keep)

        st = stages["integer_answer"]
        with Timer(st):
            st.entered += small.num_rows
            labels: list[str | None] = []
            for answer in small.column("answer").to_pylist():
                label, reason = classify_answer(answer)
                if label is None:
                    st.reasons[reason] += 1
                labels.append(label)
            label_array = pa.array(labels, pa.string())
            small = small.append_column("__label__", label_array).filter(pc.is_valid(label_array))

        st = stages["not_amc_aime"]
        with Timer(st):
            st.entered += small.num_rows
            by_source = pc.match_substring_regex(small.column("source"), _SOURCE_AMC_AIME_RE)
            _drop_counts(st, small.column("source"), pc.invert(by_source), "source=")
            small = small.filter(pc.invert(by_source))
            texts = table.select(["problem", "solution"]).take(small.column("__row__"))
            by_text = pc.match_substring_regex(texts.column("problem"), PROBLEM_AMC_AIME_RE)
            count = pc.sum(by_text).as_py() or 0
            if count:
                st.reasons["problem text names AIME/AMC"] += count
                small, texts = small.filter(pc.invert(by_text)), texts.filter(pc.invert(by_text))

        st = stages["valid_flags"]
        with Timer(st):
            st.entered += small.num_rows
            for name in ("problem_is_valid", "solution_is_valid"):
                flags = small.column(name)
                keep = pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(flags)), "yes")
                _drop_counts(st, flags, keep, f"{name}=")
                small, texts = small.filter(keep), texts.filter(keep)
            kept.extend(
                zip(
                    texts.column("problem").to_pylist(),
                    texts.column("solution").to_pylist(),
                    small.column("__label__").to_pylist(),
                )
            )
        if progress is not None:
            progress(rows_read)

    candidates = _dedup_and_quality(kept, stages, min_problem_chars, eval_digests)
    return FilterResult(candidates, [stages[n] for n in STAGE_NAMES], rows_read, read_seconds)


def _dedup_and_quality(
    kept: list[tuple[str, str, str]],
    stages: dict[str, Stage],
    min_problem_chars: int,
    eval_digests: dict[str, str],
) -> list[Candidate]:
    """Stages 6-8 over the survivors of the vectorized stages, in source order."""
    st = stages["dedup"]
    with Timer(st):
        st.entered = len(kept)
        first: dict[str, int] = {}
        conflicted: set[str] = set()
        rows: list[Candidate] = []
        for problem, solution, label in kept:
            normalized = normalize_problem(problem)
            digest = hashlib.md5(normalized.encode("utf-8")).hexdigest()
            at = first.get(digest)
            if at is None:
                first[digest] = len(rows)
                rows.append(Candidate(problem, solution, label, digest, len(normalized)))
            elif rows[at].label == label:
                st.reasons["duplicate problem"] += 1
            else:
                st.reasons["duplicate problem"] += 1
                conflicted.add(digest)
        if conflicted:
            st.reasons["copies disagree on the answer (all dropped)"] += len(conflicted)
            rows = [row for row in rows if row.digest not in conflicted]
        kept.clear()

    st = stages["quality"]
    with Timer(st):
        st.entered = len(rows)
        good: list[Candidate] = []
        for row in rows:
            if row.normalized_chars < min_problem_chars:
                st.reasons[f"problem shorter than {min_problem_chars} characters"] += 1
            elif not row.solution.strip():
                st.reasons["empty solution"] += 1
            else:
                good.append(row)

    st = stages["not_in_eval_sets"]
    with Timer(st):
        st.entered = len(good)
        out: list[Candidate] = []
        for row in good:
            name = eval_digests.get(row.digest)
            if name is None:
                out.append(row)
            else:
                st.reasons[f"problem is in the {name} set"] += 1
    return out


# --------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """An evaluation file built from an external source."""

    name: str
    out_file: str
    datasource: str
    rows: list[dict[str, str]]
    info: SourceInfo
    stages: list[Stage]
    requested: int | None
    source_digests: set[str]

    def to_report(self) -> dict[str, Any]:
        return {
            "file": self.out_file,
            "datasource": self.datasource,
            "source": self.info.to_report(),
            "requested": self.requested,
            "written": len(self.rows),
            "stages": [s.to_report() for s in self.stages],
        }


def _pick_column(names: Sequence[str], wanted: Sequence[str], origin: str) -> str:
    lower = {n.lower(): n for n in names}
    for want in wanted:
        if want in lower:
            return lower[want]
    raise PrepError(f"{origin}: no {'/'.join(wanted)} column (has {', '.join(names)}); give a problem/answer dataset")


PROBLEM_COLUMNS = ("problem", "question", "input")
"""Eval sources name the problem so; ``input`` is rft's own row format."""
ANSWER_COLUMNS = ("answer", "label")


def read_eval_rows(spec: str, revision: str | None = None) -> tuple[SourceInfo, list[tuple[Any, Any]]]:
    """(problem, answer) pairs of a small evaluation source, and its provenance.

    Lines that are not JSON objects (malformed, not UTF-8) are reported in one warning line per
    file with the first line number, and come back as ``(None, None)`` so that the report counts them.
    """
    files = resolve_files(spec, (".parquet", ".jsonl", ".json"), "a file of problems with answers")
    records: list[dict[str, Any]] = []
    if files is None:
        info, loaded = load_hub(spec, None, revision, "pass a local parquet/JSONL file, or 'none' to skip this set")
        records = list(loaded)
    else:
        import pyarrow.parquet as pq

        if revision:
            raise PrepError(f"{spec}: a revision pins a hub dataset; a local file is pinned by its sha256 (drop it)")
        info = SourceInfo(spec=spec, kind="files")
        for path in files:
            info.files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": _readable_sha256(path)})
            if path.suffix == ".parquet":
                try:
                    records.extend(pq.read_table(path).to_pylist())
                except Exception as exc:
                    raise PrepError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
            else:
                records.extend(_read_json_records(path))
        info.rows = len(records)
    if not records:
        raise PrepError(f"{spec}: holds no rows")
    names = sorted({key for rec in records if isinstance(rec, dict) for key in rec})
    problem_col = _pick_column(names, PROBLEM_COLUMNS, spec)
    answer_col = _pick_column(names, ANSWER_COLUMNS, spec)
    pairs = [(rec.get(problem_col), rec.get(answer_col)) if isinstance(rec, dict) else (None, None) for rec in records]
    return info, pairs


def _read_json_records(path: Path) -> list[Any]:
    """Rows of a JSONL file (or a JSON array file); a line that is not a JSON object becomes None."""
    text = path.read_bytes()
    if path.suffix == ".json" and text.lstrip()[:1] == b"[":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise PrepError(f"{path}: not valid JSON ({exc})") from exc
    out: list[Any] = []
    bad: Counter = Counter()
    first: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            kind = None if isinstance(row, dict) else "not a JSON object"
        except UnicodeDecodeError:
            row, kind = None, "not UTF-8"
        except ValueError:
            row, kind = None, "not valid JSON"
        if kind:
            bad[kind] += 1
            first.setdefault(kind, number)
            row = None
        out.append(row)
    if bad:
        log(f"warning: {path}: skipped " + ", ".join(f"{n} line(s) {kind} (first: line {first[kind]})"
                                                     for kind, n in bad.items()))
    return out


def _answer_text(answer: Any) -> tuple[str | None, str]:
    """An eval answer as text, or ``(None, reason)``: integers and integer-valued floats are accepted."""
    if isinstance(answer, bool):
        return None, "answer is true/false"
    if isinstance(answer, int):
        return str(answer), ""
    if isinstance(answer, float):
        return (str(int(answer)), "") if answer.is_integer() else (None, "decimal")
    if isinstance(answer, str):
        return answer, ""
    return None, "missing answer" if answer is None else f"answer is {type(answer).__name__}"


KNOWN_WRONG_ANSWERS = (
    # (pieces of the problem without whitespace, the wrong answer some copies carry, the right one, which problem)
    (("4g(f(\\sin(2\\pix)))", "4g(f(\\cos(3\\piy)))"), "384", "385", "AIME 2024 I problem 12"),
)
"""Errors known in circulating copies of eval sets; a copy that carries one gets a warning."""


def known_wrong_answer(problem: str, label: str) -> str | None:
    """A warning when ``(problem, label)`` is a known wrong answer of a circulating copy."""
    squeezed = "".join(problem.split())
    for words, wrong, right, where in KNOWN_WRONG_ANSWERS:
        if label == wrong and all(w in squeezed for w in words):
            return f"{where} is labelled {wrong} here; its answer is {right} (a known error of some copies): fix the source"
    return None


def build_eval_set(
    name: str, spec: str, out_file: str, datasource: str, size: int | None, seed: int, revision: str | None = None
) -> EvalSet:
    """Filter an evaluation source to clean integer answers, dedup it, and sample ``size`` rows.

    Every dropped row is counted in the report and summed up in one warning line; a source with
    fewer usable problems than ``size`` is refused rather than written short under its name.
    """
    info, pairs = read_eval_rows(spec, revision)
    wf, integer, dedup = Stage("well_formed"), Stage("integer_answer"), Stage("dedup")
    wf.entered = len(pairs)
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    source_digests = {problem_hash(p) for p, _ in pairs if isinstance(p, str)}
    for problem, raw in pairs:
        answer, why = _answer_text(raw)
        if not isinstance(problem, str) or not problem.strip():
            wf.reasons["missing problem"] += 1
            continue
        if answer is None:
            wf.reasons[why] += 1
            continue
        integer.entered += 1
        label = parse_integer_answer(answer)
        if label is None:
            integer.reasons[answer_rejection_reason(answer)] += 1
            continue
        dedup.entered += 1
        digest = problem_hash(problem)
        if digest in seen:
            dedup.reasons["duplicate problem"] += 1
            continue
        seen.add(digest)
        warning = known_wrong_answer(problem, label)
        if warning:
            log(f"warning: {spec}: {warning}")
        rows.append((problem, label, digest))
    dropped = [(reason, n) for stage in (wf, integer, dedup) for reason, n in stage.reasons.items()]
    if dropped:
        log(f"{name}: {sum(n for _, n in dropped)} of {len(pairs)} row(s) of {spec} dropped: "
            + ", ".join(f"{reason} {n}" for reason, n in sorted(dropped, key=lambda d: -d[1])))
    if size is not None and len(rows) < size:
        raise PrepError(f"--{name}-size {size}: {spec} has only {len(rows)} usable problem(s); ask for at most {len(rows)}")
    if size is not None:  # a sample: in key order, like the training splits
        rows = sorted(rows, key=lambda r: split_key(seed, r[2]))[:size]
    out = [{"input": p, "label": lab, "datasource": datasource} for p, lab, _ in rows]
    return EvalSet(name, out_file, datasource, out, info, [wf, integer, dedup], size, source_digests)


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


@dataclass
class SplitSizes:
    """Requested sizes of the training-side files."""

    rl_pool: int
    sft_train: int
    sft_dev: int
    pool_subset: int
    probe: int


def make_splits(
    candidates: list[Candidate], sizes: SplitSizes, seed: int, sft_stage: Stage | None = None
) -> dict[str, list[dict[str, str]]]:
    """Training-side files from the candidates; pool, SFT train and SFT dev never share a problem.

    The pool takes the first ``rl_pool`` problems in ``split_key`` order; SFT train and
    dev take the next problems whose solution ends in ``\\boxed{label}``. The 400-prompt
    subset is the head of the pool and the ID probe the problems right after it.
    ``sft_stage``, when given, counts the problems looked at for SFT and why some were skipped.
    """
    sft_stage = sft_stage if sft_stage is not None else Stage("sft_selection")
    order = sorted(candidates, key=lambda c: split_key(seed, c.digest))
    if len(order) < sizes.rl_pool:
        raise PrepError(
            f"only {len(order)} problems pass the filters but --rl-pool-size asks for {sizes.rl_pool}; "
            "lower the split sizes or use a larger --source"
        )
    pool = order[: sizes.rl_pool]
    sft: list[dict[str, str]] = []
    want = sizes.sft_train + sizes.sft_dev
    for cand in order[sizes.rl_pool :]:
        if len(sft) == want:
            break
        sft_stage.entered += 1
        output, reason = sft_target(cand.solution, cand.label)
        if output is None:
            sft_stage.reasons[reason] += 1
        else:
            sft.append({"input": cand.problem, "output": output, "label": cand.label})
    if len(sft) < want:
        raise PrepError(
            f"only {len(sft)} problems outside the RL pool have a solution ending in \\boxed{{answer}}, "
            f"but --sft-size + --dev-size ask for {want}; lower them or --rl-pool-size"
        )
    pool_rows = [{"input": c.problem, "label": c.label} for c in pool]
    subset_end = sizes.pool_subset
    probe_rows = [dict(row, datasource="id_probe") for row in pool_rows[subset_end : subset_end + sizes.probe]]
    return {
        OUT_POOL: pool_rows,
        OUT_POOL_SUBSET: pool_rows[:subset_end],
        OUT_PROBE_ID: probe_rows,
        OUT_SFT_TRAIN: sft[: sizes.sft_train],
        OUT_SFT_DEV: sft[sizes.sft_train :],
    }


def check_disjoint(files: dict[str, list[dict[str, str]]], names: Sequence[str]) -> dict[str, int]:
    """Pairwise overlap by problem hash of the named files; every value must be 0."""
    hashes = {name: {problem_hash(row["input"]) for row in files[name]} for name in names if name in files}
    present = [n for n in names if n in hashes]
    return {
        f"{a} & {b}": len(hashes[a] & hashes[b])
        for i, a in enumerate(present)
        for b in present[i + 1 :]
    }


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> dict[str, Any]:
    """Write rows as UTF-8 JSON lines; return row count, bytes and sha256."""
    digest = hashlib.sha256()
    count = 0
    size = 0
    with open(path, "wb") as handle:
        for row in rows:
            data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            handle.write(data)
            digest.update(data)
            count += 1
            size += len(data)
        handle.flush()
        os.fsync(handle.fileno())
    return {"rows": count, "bytes": size, "sha256": digest.hexdigest()}


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON document (indent 2, trailing newline) and fsync it."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write a JSON document next to ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".prep-{os.getpid()}-{path.name}.", dir=path.parent)  # see recover()
    os.close(fd)
    try:
        write_json(Path(tmp), obj)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; match the other outputs
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_funnel(path: Path, report: dict[str, Any]) -> None:
    """PNG of rows remaining after each stage (dropped counts beside the bars) and the file sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [st["name"] for st in stages][::-1]
    remaining = [st["remaining"] for st in stages][::-1]
    dropped = [st["dropped"] for st in stages][::-1]
    outputs = report["outputs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    bars = ax1.barh(names, remaining, color="#4c72b0")
    top = max(remaining) if remaining else 1
    for bar, left, gone in zip(bars, remaining, dropped):
        note = f"{left:,}" + (f"  (-{gone:,})" if gone else "")
        ax1.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax1.set_xlim(0, top * 1.35)
    ax1.set_xlabel("rows remaining after the stage")
    ax1.set_title(f"filter stages (source: {report['source']['spec']})", fontsize=9)
    files = sorted(outputs)[::-1]
    bars = ax2.barh(files, [outputs[f]["rows"] for f in files], color="#55a868")
    for bar, name in zip(bars, files):
        ax2.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {outputs[name]['rows']:,}", va="center",
                 fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("rows written (log scale)")
    ax2.set_title(f"files (seed {report['args']['seed']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


PUBLISH_JOURNAL = ".prep-journal.json"
"""Present in ``--out-dir`` only while a new set of outputs replaces the old one."""
PREVIOUS = "previous"
"""Folder inside the staging folder holding hard links to the set being replaced."""


def publish(out_dir: Path, files: dict[str, list[dict[str, str]]], report: dict[str, Any]) -> None:
    """Replace the outputs in ``out_dir`` with a new, complete set: never a mix of two sets.

    Every file is first written whole into a staging folder inside ``out_dir``, beside hard links
    to the files it replaces. A journal naming the staging folder is then written, the files are
    renamed into place with SIGINT/SIGTERM/SIGHUP held, and the journal is removed. A failure
    during the renames puts the previous set back; a process killed there leaves the journal, and
    the next run or ``--check`` completes the new set (:func:`recover`). The report goes last.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        recover(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".prep-{os.getpid()}-", dir=out_dir))
    except OSError as exc:
        raise PrepError(f"{out_dir}: cannot write there ({exc.strerror or exc}); choose another --out-dir") from exc
    journal = out_dir / PUBLISH_JOURNAL
    try:
        outputs: dict[str, Any] = {}
        for name in sorted(files):
            outputs[name] = write_jsonl(staging / name, files[name])
        report["outputs"] = outputs
        write_json(staging / OUT_REPORT, report)
        names = sorted(files)
        try:
            plot_funnel(staging / OUT_PLOT, report)
            names.append(OUT_PLOT)
        except Exception as exc:  # the picture is a convenience; the data must not depend on it
            log(f"warning: {OUT_PLOT} not drawn ({type(exc).__name__}: {exc})")
        names.append(OUT_REPORT)
        (staging / PREVIOUS).mkdir()
        for name in names:
            if (out_dir / name).is_file():
                os.link(out_dir / name, staging / PREVIOUS / name)
        _fsync_dir(staging)
        with signals_held():
            write_json_atomic(journal, {"staging": staging.name, "names": names})
            try:
                _move_in(out_dir, staging, names)
            except BaseException:
                _restore_previous(out_dir, staging, names)
                journal.unlink(missing_ok=True)
                raise
            journal.unlink()
            _fsync_dir(out_dir)
    finally:
        if not journal.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_in(out_dir: Path, staging: Path, names: Sequence[str]) -> None:
    """Rename each staged file over its final name; a name already moved is skipped (resumable)."""
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, out_dir / name)
    _fsync_dir(out_dir)


def _restore_previous(out_dir: Path, staging: Path, names: Sequence[str]) -> None:
    """Put the replaced set back: its files from the hard links, and no file it did not have."""
    for name in names:
        kept = staging / PREVIOUS / name
        if kept.exists():
            os.replace(kept, out_dir / name)
        elif not (staging / name).exists():  # moved in, but the previous set had no such file
            (out_dir / name).unlink(missing_ok=True)
    _fsync_dir(out_dir)


def recover(out_dir: Path) -> str | None:
    """Finish what a killed :func:`publish` left in ``out_dir``; returns what was done, if anything.

    With a journal, the staged set is complete (the journal is written after it), so the renames
    are completed. Staging folders of processes that are gone are removed.
    """
    done = None
    journal = out_dir / PUBLISH_JOURNAL
    if journal.exists():
        try:
            entry = json.loads(journal.read_text(encoding="utf-8"))
            staging, names = out_dir / entry["staging"], list(entry["names"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrepError(f"{journal}: unreadable ({exc}); remove it and run prepare_sft_data.py again") from None
        with signals_held():
            if staging.is_dir():
                _move_in(out_dir, staging, names)
            journal.unlink()
            _fsync_dir(out_dir)
        done = f"{out_dir}: completed an interrupted write of {len(names)} file(s)"
    for leftover in out_dir.glob(".prep-*"):  # staging folders and temporary files, ".prep-<pid>-..."
        parts = leftover.name.split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if leftover.name == PUBLISH_JOURNAL or (pid is not None and pid != os.getpid() and pid_running(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return done


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_outputs(out_dir: Path) -> list[str]:
    """Problems found when checking the files in ``out_dir`` against its report (empty when all match).

    Every output the report lists must exist with its sha256, every training output must be
    listed, and no output file may be present that the report does not list: a report edited to
    drop a tampered file's entry, or emptied, does not pass. Only a report rewritten to agree with
    tampered files does (it would need new hashes, by hand).
    """
    report_path = out_dir / OUT_REPORT
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{report_path}: cannot read the report ({exc}); run prepare_sft_data.py again"]
    outputs = report.get("outputs") if isinstance(report, dict) else None
    if not isinstance(outputs, dict):
        return [f"{report_path}: malformed (no 'outputs' object); run prepare_sft_data.py again"]
    problems = []
    for name in REQUIRED_OUTPUTS:
        if name not in outputs:
            problems.append(f"{report_path}: does not list {name}, which every run writes")
    for name in ALL_OUTPUTS:
        if name not in outputs and (out_dir / name).exists():
            problems.append(f"{out_dir / name}: present but not in {OUT_REPORT} (from another run, or the report was edited)")
    for name, expected in sorted(outputs.items()):
        path = out_dir / name
        sha = expected.get("sha256") if isinstance(expected, dict) else None
        if name not in ALL_OUTPUTS or not isinstance(sha, str):
            problems.append(f"{report_path}: malformed entry for {name!r}; run prepare_sft_data.py again")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != sha:
            problems.append(f"{path}: sha256 differs from the report (file changed or from another run)")
    return problems


def log(message: str) -> None:
    """One line of progress to stderr."""
    print(message, file=sys.stderr, flush=True)
