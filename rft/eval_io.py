"""Files of the post-hoc evaluation: datasets in, per-sample JSONL and summaries out.

Nothing here generates or scores text; it reads and writes the files so that a
run can be interrupted at any point and resumed without losing or mixing samples.

* Datasets are JSONL rows ``{"input": ..., "label": ...}`` (the keys are options),
  as the training data preparation writes them.
* Samples go to one JSONL file per (model, dataset, mode). Each line is one
  finished sample and carries the ``run_key`` of the settings that made it; a
  rerun with the same settings skips the samples already there, and a rerun with
  different settings is refused instead of silently mixing the two.
* Whole files (summaries) are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "EvalInputError",
    "Problem",
    "load_problems",
    "read_text_lines",
    "file_sha256",
    "dir_content_sha256",
    "model_dir_fingerprint",
    "run_key",
    "SampleStore",
    "atomic_write_text",
    "safe_name",
]


class EvalInputError(ValueError):
    """Bad input from the user: the message names the file and the fix."""


@dataclass(frozen=True)
class Problem:
    """One dataset row: its 0-based index among the rows, the model input, the label and its line."""

    index: int
    input: Any  # a string, or a list of chat messages as OpenRLHF also accepts
    label: str
    line: int = 0  # 1-based line of the file, for messages


def read_text_lines(path: str | Path, what: str, flag: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file; one-line errors for what cannot be read.

    A folder, a file that cannot be opened and bytes that are not UTF-8 each raise
    :class:`EvalInputError` naming the file (and the line), never a traceback.
    """
    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"{path}: is a folder, not a {what}; pass the file itself to {flag}")
    if not path.exists():
        raise EvalInputError(f"{path}: {what} not found; pass an existing file to {flag}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalInputError(f"{path}: cannot read ({e.strerror or e}); check its permissions or pass another {flag}") from None
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise EvalInputError(
                f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-save the file as UTF-8"
            ) from None
    return out


def load_problems(path: str | Path, input_key: str = "input", label_key: str = "label") -> list[Problem]:
    """Read a JSONL dataset; raise :class:`EvalInputError` naming the line on bad rows.

    Blank lines are skipped; labels are kept as strings (an integer label becomes
    its decimal string). An empty label is refused: the reward scores it wrong
    whatever the model says, so it would lower pass@1 without a word.
    """
    path = Path(path)
    problems: list[Problem] = []
    for lineno, line in read_text_lines(path, "dataset file", "--dataset"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise EvalInputError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        for key, flag in ((input_key, "--input-key"), (label_key, "--label-key")):
            if key not in row:
                keys = ", ".join(sorted(row)) or "none"
                raise EvalInputError(f"{path}:{lineno}: no {key!r} key (keys: {keys}); name the right one with {flag}")
        label = row[label_key]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise EvalInputError(f"{path}:{lineno}: label must be a string or an integer, got {label!r}")
        if not str(label).strip():
            raise EvalInputError(f"{path}:{lineno}: empty {label_key!r}; every row needs its answer (or remove the row)")
        text = row[input_key]
        if not (isinstance(text, str) and text.strip()) and not (isinstance(text, list) and text):
            raise EvalInputError(f"{path}:{lineno}: empty {input_key!r}; remove the row or fill it in")
        problems.append(Problem(index=len(problems), input=text, label=str(label), line=lineno))
    if not problems:
        raise EvalInputError(f"{path}: no rows; the dataset must hold at least one JSON line")
    return problems


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_content_sha256(path: str | Path) -> str:
    """Hex sha256 over every regular file under ``path``: relative names and bytes.

    Timestamps and permissions do not count, so a copied directory hashes the
    same; a changed, added, removed or renamed file changes the hash.
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


def model_dir_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model directory: config, merge record, file names and sizes.

    Hashing tens of gigabytes of weights on every run is too slow, so the weights
    count by name and size; ``config.json`` and the merge record (which holds the
    adapter's content hash) count by content. A path that is not a local
    directory (a hub id) is identified by its name.
    """
    root = Path(path)
    if not root.is_dir():
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\n".encode())
        if rel in ("config.json", "rft_merge.json"):
            h.update(p.read_bytes())
    return h.hexdigest()


def run_key(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings that determine a sample (16 hex digits)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    """File-name-safe form of a model, dataset or mode name (``@`` kept, others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("_") or "x"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SampleStore:
    """Append-only JSONL of finished samples for one (model, dataset, mode).

    Every record has integer ``problem`` and ``sample`` fields and the store's
    ``run_key``. :meth:`load` returns the finished samples keyed by
    ``(problem, sample)``. A last line cut short by a crash (no trailing newline,
    not valid JSON) is dropped from the file with a note, since that sample was
    never finished; any other damage is an error, and nothing is deleted.
    """

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Read the finished samples; raise :class:`EvalInputError` on a foreign or damaged file."""
        if not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise EvalInputError(f"{self.path}: cannot read ({e.strerror or e}); check its permissions or use another --output-dir") from None
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            try:
                json.loads(tail)
                complete = True
            except ValueError:
                complete = False
            if complete:  # a whole record that only lacks its newline: keep it
                with self.path.open("ab") as f:
                    f.write(b"\n")
                data += b"\n"
            else:
                print(f"{self.path}: dropping an unfinished last line ({len(tail)} bytes) left by an interrupted run")
                with self.path.open("r+b") as f:
                    f.truncate(cut)
                data = data[:cut]
        records: dict[tuple[int, int], dict[str, Any]] = {}
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise EvalInputError(
                    f"{self.path}:{lineno}: damaged record ({why}); move the file away or delete that line"
                ) from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), int) for k in ("problem", "sample")):
                raise EvalInputError(
                    f"{self.path}:{lineno}: not a sample record (no integer problem and sample); "
                    "move the file away or delete that line"
                )
            if rec.get("run_key") != self.key:
                raise EvalInputError(
                    f"{self.path}:{lineno}: written with other settings (run_key {rec.get('run_key')} != {self.key}); "
                    "use another --output-dir or move this file away"
                )
            records[(int(rec["problem"]), int(rec["sample"]))] = rec
        return records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append finished records and flush them to disk before returning."""
        lines = []
        for rec in records:
            rec = dict(rec, run_key=self.key)
            lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n")
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
