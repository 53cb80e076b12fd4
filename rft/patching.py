"""Apply, check, revert and make rft's patches against an installed OpenRLHF.

Run through ``apply_patches.sh`` (see ``--help`` there). The rules, as dpkg and quilt apply them:

* ``patches/series`` lists the patches in order (one file name a line, ``#`` comments);
  ``patches/MANIFEST.sha256`` holds the sha256 of every target file as pip installs it.
* Every patch runs with ``LC_ALL=C patch -p1 -F 0 -N -t -u -V never`` (no fuzz, no backups),
  and only ever inside a scratch copy of the target files, never in site-packages.
* What is applied is decided by the manifest, not guessed from dry runs (a patch that only adds
  lines can apply twice): for each target file, the patches of the series that touch it are
  reversed, last first, from the installed file; the file holds the first k of them when
  reversing those k gives the manifest's sha256. No such k: the file is not the pristine 0.9.3
  file the patches were made against, and nothing is done.
* Writing is all or nothing: each changed file is replaced atomically (temp file + os.replace)
  and, if any write fails or is interrupted, the files already replaced are restored; Ctrl-C,
  SIGTERM and SIGHUP are held back while the files are written. The install is locked
  (flock on the package directory) while this runs. No .orig/.rej file is ever created there.
* Nothing else can stop it halfway for good: after a SIGKILL or a power cut every file is still
  whole and holds a prefix of the patches that touch it, which the manifest recognises, so the
  next run completes the series (or ``--revert`` undoes it) and removes the temp files of its own
  that the kill left (``.NAME.rft-XXXXXXXX.tmp`` beside a target, ``rft-patch-PID-*`` scratch
  folders of processes that no longer run). No journal is needed: the files are the journal.
* The install must be the 0.9.3 wheel as pip installed it: its dist-info's version, and every
  file its RECORD lists (urlsafe-base64 sha256) except the targets, which the manifest judges;
  a module that RECORD does not list (a file of another release) is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    # Run as a script, Python puts rft/ first on sys.path, where rft/openrlhf (the patches' hooks)
    # would shadow the installed openrlhf: look things up as the training interpreter does.
    del sys.path[0]

import argparse
import base64
import contextlib
import csv
import fcntl
import hashlib
import importlib.machinery
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

PACKAGE = "openrlhf"
VERSION = "0.9.3"
PATCH_FLAGS = ["-p1", "-F", "0", "-N", "-t", "-u", "-V", "never", "-r", "-"]
# Environment variables that would change how GNU patch behaves; never inherited.
PATCH_ENV_OVERRIDES = ("POSIXLY_CORRECT", "PATCH_GET", "PATCH_VERSION_CONTROL", "SIMPLE_BACKUP_SUFFIX",
                       "VERSION_CONTROL", "QUILT_PATCH_OPTS")
PROG = "apply_patches.sh"
CHECKOUT = Path(__file__).resolve().parents[1]
"""The rft checkout this manager belongs to; the patched OpenRLHF must import rft from here."""
REINSTALL = f"pip install --no-deps --force-reinstall {PACKAGE}=={VERSION}"
SCRATCH_PREFIX = "rft-patch-"
"""Scratch folders in $TMPDIR are named rft-patch-PID-XXXXXXXX, so a later run can tell a dead run's."""
TEMP_MARK = ".rft-"
"""write_atomic's temp files are .NAME.rft-XXXXXXXX.tmp (mkstemp adds 8 characters of [a-z0-9_])."""

EXIT_OK = 0
EXIT_CONFLICT = 1
EXIT_USAGE = 2
EXIT_ENV = 3
EXIT_WRITE = 4
EXIT_NOT_APPLIED = 5
EXIT_RFT_ELSEWHERE = 6
EXIT_SIGNAL = 128  # plus the signal's number: 130 Ctrl-C (SIGINT), 129 SIGHUP, 143 SIGTERM

EXIT_CODES = f"""exit codes:
  {EXIT_OK}  done, or nothing to do (--status: every patch is applied and import rft finds this checkout)
  {EXIT_CONFLICT}  a patch conflicts with the installed files; nothing was changed
  {EXIT_USAGE}  bad arguments, or a missing or malformed series, patch or manifest
  {EXIT_ENV}  wrong environment: openrlhf not found, not the {VERSION} wheel (dist-info version, RECORD,
     a module RECORD does not list), a target file that is neither pristine {VERSION} (see
     patches/MANIFEST.sha256) nor patched by this series, or GNU patch missing; nothing was changed
  {EXIT_WRITE}  writing a file failed; every file already written was restored
  {EXIT_NOT_APPLIED}  --status only: some patches are not applied, or partly (an interrupted run;
     apply completes it, --revert undoes it); none conflicts
  {EXIT_RFT_ELSEWHERE}  --status only: every patch is applied, but import rft in PYTHON (with --target DIR
     first on its path) does not find this checkout; pip install -e <this checkout>
  130, 129, 143  interrupted by Ctrl-C (SIGINT), SIGHUP or SIGTERM: one line says so; every file is
     whole and the install holds the series either as before or complete (run it again)"""


class PatchError(Exception):
    """An error with its exit code; the message is one line, details follow on later lines."""

    def __init__(self, code: int, message: str, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so scratch folders go."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Patch:
    """One patch file of the series."""

    name: str
    path: Path
    targets: list[str]  # paths relative to the site directory, e.g. openrlhf/models/loss.py
    hunks: dict[str, list[str]] = field(default_factory=dict)  # target -> hunk texts, in order
    sections: dict[str, str] = field(default_factory=dict)  # target -> its part of the diff


@dataclass
class Outcome:
    """What one patch does to the current tree: 'applied', 'applies', 'partial' or 'conflicts'.

    'partial': an interrupted run wrote some of the patch's files (``holding``) and not the others;
    the rest applies, so apply completes it and --revert undoes it.
    """

    patch: Patch
    state: str
    conflict: str = ""  # one-line description of the first rejected hunk
    details: str = ""  # the rejected hunk(s) and patch(1)'s own output
    holding: list[str] = field(default_factory=list)  # 'partial': the files that already hold it


# ---------------------------------------------------------------- reading the inputs


def read_series(series: Path) -> list[str]:
    """Patch names of a quilt series file, in order."""
    if not series.is_file():
        raise PatchError(EXIT_USAGE, f"{series}: series file not found; create it (one patch name a line)")
    names = []
    for number, line in enumerate(series.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 1 or "/" in words[0]:
            raise PatchError(EXIT_USAGE, f"{series}:{number}: expected one patch file name, got {line.strip()!r}")
        if words[0] in names:
            raise PatchError(EXIT_USAGE, f"{series}:{number}: {words[0]} is listed twice; keep one line")
        names.append(words[0])
    return names


def read_manifest(manifest: Path) -> dict[str, str]:
    """``sha256sum``-format manifest: relative path -> hex digest."""
    if not manifest.is_file():
        raise PatchError(EXIT_USAGE, f"{manifest}: manifest not found; it lists the pristine sha256 of every target")
    digests = {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not match:
            raise PatchError(EXIT_USAGE, f"{manifest}:{number}: not a sha256sum line: {line.strip()!r}")
        digests[match.group(2)] = match.group(1)
    return digests


def read_patch(path: Path) -> Patch:
    """Parse a unified diff with a/openrlhf/... and b/openrlhf/... paths."""
    if not path.is_file():
        raise PatchError(EXIT_USAGE, f"{path}: patch listed in the series but not found; add it or drop its line")
    lines = path.read_text().splitlines(keepends=True)
    targets: list[str] = []
    hunks: dict[str, list[str]] = {}
    sections: dict[str, str] = {}
    current = None
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            current = None  # the next file's header; its name comes with the +++ line
        elif line.startswith("+++ ") and i > 0 and lines[i - 1].startswith("--- "):
            old = lines[i - 1][4:].split("\t")[0].strip()
            new = line[4:].split("\t")[0].strip()
            if not (old.startswith(f"a/{PACKAGE}/") and new == "b/" + old[2:]):
                raise PatchError(
                    EXIT_USAGE,
                    f"{path}: file header '{old}' -> '{new}' is not a/{PACKAGE}/... -> b/{PACKAGE}/... "
                    f"(new, deleted and renamed files are not supported)",
                )
            current = new[2:]
            if current in targets:
                raise PatchError(EXIT_USAGE, f"{path}: {current} appears twice; merge its hunks into one section")
            targets.append(current)
            hunks[current] = []
            sections[current] = lines[i - 1] + line
        elif line.startswith("@@ ") and current is not None:
            hunks[current].append(line)
            sections[current] += line
        elif current is not None and hunks[current] and line[:1] in (" ", "+", "-", "\\"):
            hunks[current][-1] += line
            sections[current] += line
    if not targets:
        raise PatchError(EXIT_USAGE, f"{path}: no unified diff found (expected --- a/{PACKAGE}/... lines)")
    return Patch(name=path.name, path=path, targets=targets, hunks=hunks, sections=sections)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- finding the install


def find_site(target: str | None) -> Path:
    """The directory that holds openrlhf/: ``--target`` or where this Python imports it from."""
    if target:
        site = Path(target).resolve()
        if not (site / PACKAGE).is_dir():
            raise PatchError(EXIT_ENV, f"{site}: no {PACKAGE}/ package here; --target takes the site-packages dir")
        return site
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(
            EXIT_ENV,
            f"{PACKAGE} is not importable by {sys.executable}; activate its environment or set PYTHON=",
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def dist_info(site: Path) -> Path:
    """The one ``openrlhf-*.dist-info`` next to the package."""
    found = sorted(site.glob(f"{PACKAGE}-*.dist-info"))
    if not found:
        raise PatchError(
            EXIT_ENV,
            f"{site}: no {PACKAGE}-*.dist-info, so the version cannot be checked; "
            f"install with pip install --no-deps {PACKAGE}=={VERSION}",
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise PatchError(EXIT_ENV, f"{site}: several {PACKAGE} installs ({names}); reinstall {PACKAGE}=={VERSION}")
    return found[0]


def installed_version(site: Path) -> str:
    """The version in ``openrlhf-*.dist-info/METADATA`` next to the package."""
    info = dist_info(site)
    for line in (info / "METADATA").read_text(errors="replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise PatchError(EXIT_ENV, f"{info}/METADATA has no Version line; reinstall {PACKAGE}=={VERSION}")


def read_record(record: Path) -> dict[str, str]:
    """A wheel RECORD (PEP 376 csv: path, sha256=<urlsafe base64, no padding>, size) as path -> hex digest.

    Entries without a hash (RECORD itself, the .pyc files pip compiled) map to ''.
    """
    if not record.is_file():
        raise PatchError(EXIT_ENV, f"{record}: missing, so the installed files cannot be checked; {REINSTALL}")
    rows = {}
    with record.open(newline="", encoding="utf-8", errors="replace") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            algorithm, _, value = row[1].partition("=") if len(row) == 3 else ("", "", "")
            if len(row) != 3 or (row[1] and algorithm != "sha256"):
                raise PatchError(EXIT_ENV, f"{record}:{number}: not a 'path,sha256=...,size' row; {REINSTALL}")
            rows[row[0]] = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex() if value else ""
    return rows


def is_module_file(rel: str) -> bool:
    """A file Python could import, outside __pycache__ (a temp or editor file is not one)."""
    name = rel.rsplit("/", 1)[-1]
    return "__pycache__" not in rel.split("/") and not name.startswith(".") and any(
        name.endswith(suffix) for suffix in importlib.machinery.all_suffixes()
    )


def distribution_problem(site: Path, manifest: dict[str, str]) -> str:
    """'' when ``site`` holds the openrlhf wheel the manifest was made from, else one line saying why not.

    RECORD must list every target with its pristine sha256 (so this dist-info is the 0.9.3
    wheel's), every other file RECORD lists must be there unchanged (a 0.9.4 ``__init__.py`` is
    not), and no module may exist that RECORD does not list (0.9.4's new modules). The targets'
    own contents are judged by the manifest, since the patches change them.
    """
    record_path = dist_info(site) / "RECORD"
    record = read_record(record_path)
    for rel, digest in manifest.items():
        if record.get(rel) != digest:
            listed = f"with sha256 {record[rel][:16]}" if record.get(rel) else "without a hash" if rel in record else "not"
            return (f"{record_path}: lists {rel} {listed}, the {VERSION} wheel's is {digest[:16]}: "
                    f"this is not the {PACKAGE} {VERSION} install; {REINSTALL}")
    for rel, digest in sorted(record.items()):
        if not rel.startswith(f"{PACKAGE}/") or not digest or rel in manifest or "__pycache__" in rel.split("/"):
            continue
        path = site / rel
        if not path.is_file():
            return f"{path}: listed in {record_path.name} but missing; {REINSTALL}"
        if sha256(path) != digest:
            return (f"{path}: differs from the {PACKAGE} {VERSION} file its RECORD lists (sha256 {sha256(path)[:16]}, "
                    f"RECORD {digest[:16]}): another release's or edited; {REINSTALL}")
    for path in sorted((site / PACKAGE).rglob("*")):
        rel = path.relative_to(site).as_posix()
        if path.is_file() and is_module_file(rel) and rel not in record:
            return (f"{path}: a module that the RECORD of {PACKAGE} {VERSION} does not list (another release's?); "
                    f"{REINSTALL}")
    return ""


@contextlib.contextmanager
def locked(site: Path) -> Iterator[None]:
    """Hold an exclusive lock on the package directory (no lock file is left behind)."""
    fd = os.open(site / PACKAGE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- running patch(1)


def run_patch(root: Path, diff: Path, reverse: bool = False, dry_run: bool = False) -> subprocess.CompletedProcess:
    """Run GNU patch with the diff file ``diff`` on the tree at ``root``, with the fixed dpkg-like flags."""
    command = ["patch", "-d", str(root), "-i", str(diff.resolve()), *PATCH_FLAGS]
    if reverse:
        command.append("-R")
    if dry_run:
        command.append("--dry-run")
    env = {key: value for key, value in os.environ.items() if key not in PATCH_ENV_OVERRIDES}
    env["LC_ALL"] = "C"
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def describe_conflict(patch: Patch, output: str) -> tuple[str, str]:
    """One line naming the patch, file and first rejected hunk; then every rejected hunk's text."""
    current, failures = None, []
    for line in output.splitlines():
        match = re.match(r"(?:checking|patching) file (\S+)", line)
        if match:
            current = match.group(1)
            continue
        match = re.match(r"Hunk #(\d+) FAILED at (\d+)", line)
        if match and current:
            failures.append((current, int(match.group(1)), match.group(2)))
    if not failures:
        first_line = output.strip().splitlines()[-1] if output.strip() else "patch(1) failed"
        return f"{patch.name} does not apply: {first_line}", output
    details = []
    for target, number, at in failures:
        texts = patch.hunks.get(target, [])
        text = texts[number - 1] if number <= len(texts) else ""
        details.append(f"{patch.name}: {target} hunk #{number} rejected (expected near line {at}):\n{text}")
    target, number, at = failures[0]
    header = (patch.hunks.get(target, [""] * number)[number - 1].splitlines() or [""])[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"{patch.name}: {target} hunk #{number} {header.strip()} does not apply near line {at}{more}", "".join(
        details
    ) + output


def try_apply(root: Path, patch: Patch, diff: Path | None = None) -> Outcome:
    """Apply ``patch`` (or ``diff``, a part of it) to the scratch tree at ``root`` if a dry run says it applies."""
    diff = diff or patch.path
    dry = run_patch(root, diff, dry_run=True)
    if dry.returncode == 0 and run_patch(root, diff).returncode == 0:
        return Outcome(patch, "applies")
    conflict, details = describe_conflict(patch, dry.stdout + dry.stderr)
    return Outcome(patch, "conflicts", conflict, details)


def apply_in(root: Path, patch: Patch) -> None:
    """Apply ``patch`` inside a scratch tree; it must succeed."""
    outcome = try_apply(root, patch)
    if outcome.state == "conflicts":
        raise PatchError(EXIT_CONFLICT, outcome.conflict, outcome.details)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The series judged against one install, with scratch trees holding the would-be results."""

    site: Path
    targets: list[str]
    outcomes: list[Outcome]
    staged: Path  # targets after applying every missing patch that applies
    pristine: Path  # targets with every applied patch reversed, verified by the manifest

    @property
    def conflicts(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "conflicts"]


class Manager:
    """Everything the command line does, for one patches directory and one install."""

    def __init__(self, patches: Path, site: Path, series: Path | None = None):
        self.patches = patches
        self.site = site
        self.series_file = series or patches / "series"
        self.manifest = read_manifest(patches / "MANIFEST.sha256")
        self.names = read_series(self.series_file)
        self.series = [read_patch(self.series_file.parent / name) for name in self.names]
        for patch in self.series:
            for target in patch.targets:
                if target not in self.manifest:
                    raise PatchError(
                        EXIT_USAGE,
                        f"{patch.name} patches {target}, which patches/MANIFEST.sha256 does not list; "
                        f"add its pristine sha256 (sha256sum {target}, run in a fresh site-packages)",
                    )

    def check_environment(self) -> None:
        if shutil.which("patch") is None:
            raise PatchError(EXIT_ENV, "GNU patch not found on PATH; install it (apt-get install patch)")
        version = installed_version(self.site)
        if version != VERSION:
            raise PatchError(
                EXIT_ENV,
                f"{self.site}: {PACKAGE} {version} is installed, the patches are for {VERSION}; "
                f"pip install --no-deps --force-reinstall {PACKAGE}=={VERSION}",
            )
        missing = [rel for rel in self.manifest if not (self.site / rel).is_file()]
        if missing:
            raise PatchError(EXIT_ENV, f"{self.site / missing[0]}: target file missing; reinstall {PACKAGE}=={VERSION}")
        problem = distribution_problem(self.site, self.manifest)
        if problem:
            raise PatchError(EXIT_ENV, problem)

    def copy_targets(self, dest: Path, source_root: Path | None = None) -> Path:
        for rel in self.manifest:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2((source_root or self.site) / rel, dest / rel)
        return dest

    def plan(self, scratch: Path) -> Plan:
        """Find what is applied (by the manifest), then stage every missing patch in ``scratch``.

        Each file is judged alone, so a run killed between two files of one patch leaves a state
        this still reads: that patch is 'partial', and only its missing files are staged.
        """
        pristine = scratch / "pristine"
        applied_count = {rel: self.recover_pristine(rel, scratch, pristine) for rel in self.manifest}
        staged = self.copy_targets(scratch / "staged")
        outcomes = []
        for patch in self.series:
            holding = [rel for rel in patch.targets if self.series_position(patch, rel) < applied_count[rel]]
            if len(holding) == len(patch.targets):
                outcomes.append(Outcome(patch, "applied"))
            elif not holding:
                outcomes.append(try_apply(staged, patch))
            else:
                rest = scratch / "partial" / patch.name
                rest.parent.mkdir(parents=True, exist_ok=True)
                rest.write_text("".join(patch.sections[rel] for rel in patch.targets if rel not in holding))
                outcome = try_apply(staged, patch, rest)
                outcomes.append(Outcome(patch, "partial", holding=holding) if outcome.state == "applies" else outcome)
        return Plan(self.site, list(self.manifest), outcomes, staged, pristine)

    def series_position(self, patch: Patch, rel: str) -> int:
        """Index of ``patch`` among the series' patches that touch ``rel``."""
        return [p.name for p in self.series if rel in p.targets].index(patch.name)

    def recover_pristine(self, rel: str, scratch: Path, pristine: Path) -> int:
        """How many of the patches touching ``rel`` the installed file holds; writes the pristine file.

        Tries k = all of them down to 0: reverse the first k (last first) from the installed file in
        scratch; the k whose result hashes to the manifest is the answer.
        """
        touching = [p for p in self.series if rel in p.targets]
        sections = []
        for number, patch in enumerate(touching):
            section = scratch / "sections" / f"{rel.replace('/', '__')}.{number}.diff"
            section.parent.mkdir(parents=True, exist_ok=True)
            section.write_text(patch.sections[rel])
            sections.append(section)
        for k in range(len(touching), -1, -1):
            trial = scratch / "trial" / str(k)
            (trial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.site / rel, trial / rel)
            if all(run_patch(trial, sections[i], reverse=True).returncode == 0 for i in reversed(range(k))):
                if sha256(trial / rel) == self.manifest[rel]:
                    (pristine / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(trial / rel, pristine / rel)
                    shutil.rmtree(scratch / "trial")
                    return k
            shutil.rmtree(trial)
        explained = (
            f"nor that file with some of the {len(touching)} patch(es) of the series that touch it"
            if touching
            else "and no patch of the series touches it"
        )
        raise PatchError(
            EXIT_ENV,
            f"{self.site / rel}: not the pristine {PACKAGE} {VERSION} file the patches were made against, {explained} "
            f"(sha256 {sha256(self.site / rel)[:16]}, manifest {self.manifest[rel][:16]}); "
            f"pip install --no-deps --force-reinstall {PACKAGE}=={VERSION}",
        )

    def stage_up_to(self, plan: Plan, dest: Path, count: int) -> Path:
        """Pristine targets plus the first ``count`` patches of the series, in ``dest``."""
        self.copy_targets(dest, source_root=plan.pristine)
        for patch in self.series[:count]:
            apply_in(dest, patch)
        return dest


# ---------------------------------------------------------------- writing the install


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals held back while the install is written, so that a write set completes or rolls back."""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into :class:`Interrupted`; ignore any after it.

    SIGTERM and SIGHUP would otherwise end the process on the spot and leave the scratch folder
    in $TMPDIR; raised as an exception, every ``finally`` runs first. Later signals are ignored so
    that they cannot cut that cleanup short. Main thread only (where Python runs handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in HELD_SIGNALS if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM and SIGHUP for the block and deliver them, once each, at its end.

    Python runs signal handlers in the main thread only, so there a recording handler replaces
    each one for the block; elsewhere this does nothing (the rollback in :func:`commit` still
    covers an exception raised mid-write). SIGKILL cannot be held by any process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def commit(site: Path, staged: Path, targets: list[str]) -> list[str]:
    """Replace every target that differs from its staged version; all or nothing.

    Signals are held while writing, and delivered only once every file and its bytecode are
    done; any exception raised mid-write (a full disk, an interrupt that got through) restores
    the files already replaced before it propagates. Bytecode goes before each write too: a
    SIGKILL right after a replace then leaves no .pyc of the old source behind.
    """
    changed = [rel for rel in targets if (staged / rel).read_bytes() != (site / rel).read_bytes()]
    done: list[tuple[Path, bytes]] = []
    with signals_held():
        try:
            for rel in changed:
                path = site / rel
                done.append((path, path.read_bytes()))  # before writing: restored even if cut off mid-write
                drop_bytecode(path)
                write_atomic(path, (staged / rel).read_bytes())
        except BaseException as exc:
            restored, restore_errors = 0, []
            for path, original in reversed(done):
                try:
                    if path.read_bytes() != original:  # the file being written may still be the old one
                        write_atomic(path, original)
                        restored += 1
                    drop_bytecode(path)
                except OSError as again:
                    restore_errors.append(f"{path}: {again}")
            if not isinstance(exc, OSError):
                raise
            state = "INSTALL HALF-WRITTEN, not restored: " + "; ".join(restore_errors) if restore_errors else (
                "install unchanged"
            )
            raise PatchError(EXIT_WRITE, f"writing {exc.filename or 'a file'} failed ({exc.strerror}); "
                             f"{restored} file(s) restored, {state}")
        for rel in changed:
            drop_bytecode(site / rel)
    return changed


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, keeping the mode.

    The temp file is ``.NAME.rft-XXXXXXXX.tmp``: a name no import sees, and one that
    :func:`remove_leftovers` recognises when a SIGKILL left it.
    """
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def leftover_pattern(name: str) -> re.Pattern[str]:
    """Temp names :func:`write_atomic` uses for ``name``; also the ``.NAME.XXXXXXXX.tmp`` of earlier rft versions."""
    return re.compile(rf"\.{re.escape(name)}(?:{re.escape(TEMP_MARK)}|\.)[a-z0-9_]{{8}}\.tmp")


def remove_leftovers(site: Path, targets: list[str]) -> list[Path]:
    """Delete the temp files that a killed run left beside the targets; only names of our own pattern.

    Called with the install locked, so no other run of this manager is writing them now.
    """
    removed = []
    for rel in targets:
        path = site / rel
        pattern = leftover_pattern(path.name)
        if not path.parent.is_dir():
            continue
        for candidate in path.parent.iterdir():
            if pattern.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                removed.append(candidate)
    return removed


def pid_running(pid: int) -> bool:
    """True unless no process ``pid`` exists (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_scratch(tmpdir: Path | None = None) -> list[Path]:
    """Delete ``rft-patch-PID-*`` folders in $TMPDIR whose process is gone (a SIGKILL leaves them).

    Only folders of this user, named by :func:`scratch_dir`, whose PID no longer runs.
    """
    removed = []
    folder = tmpdir or Path(tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}(\d+)-[a-z0-9_]{{8}}")
    with contextlib.suppress(OSError):
        for candidate in folder.iterdir():
            match = pattern.fullmatch(candidate.name)
            if not match or candidate.is_symlink() or not candidate.is_dir():
                continue
            if candidate.stat().st_uid != os.getuid() or pid_running(int(match.group(1))):
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A scratch folder in $TMPDIR named with this process's PID, so that a later run can tell it is dead."""
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def drop_bytecode(source: Path) -> None:
    """Remove cached bytecode of a rewritten module, so the next import compiles the new source."""
    for cached in (source.parent / "__pycache__").glob(f"{source.stem}.*.pyc"):
        with contextlib.suppress(OSError):
            cached.unlink()


def rft_origin(first: Path | None = None) -> Path | None:
    """Where ``import rft`` leads in this interpreter, with ``first`` at the front of sys.path; None: nowhere.

    Asks each finder on sys.meta_path (sys.path, then an editable install's finder) without
    importing rft or looking in sys.modules, so the answer is what a fresh training process gets.
    The current directory is not on the path: Ray's workers do not start in it.
    """
    saved = sys.path[:]
    if first is not None:
        sys.path.insert(0, str(first))
    try:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec("rft", None) if find_spec else None
            if spec is not None:
                break
        else:
            return None
    finally:
        sys.path[:] = saved
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    return Path(spec.origin).resolve() if spec.origin else None


def rft_problem(target: Path | None) -> str:
    """'' when ``import rft`` in PYTHON (with ``--target`` first, as PYTHONPATH=DIR uses it) finds this checkout.

    The patched OpenRLHF imports rft's hooks; from another checkout they would be other code.
    """
    origin = rft_origin(target)
    if origin == CHECKOUT / "rft":
        return ""
    where = f" with {target} first on sys.path" if target else ""
    if origin is not None and target is not None and target in origin.parents:
        return f"import rft in {sys.executable}{where} finds {origin}, inside the --target folder; remove it there"
    found = f"finds {origin}" if origin else "finds no rft"
    return f"import rft in {sys.executable}{where} {found}, not this checkout; pip install -e {CHECKOUT}"


# ---------------------------------------------------------------- commands


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


def cmd_apply(manager: Manager, plan: Plan, quiet: bool) -> int:
    if plan.conflicts:
        first = plan.conflicts[0]
        raise PatchError(EXIT_CONFLICT, f"{first.conflict}; nothing was changed", first.details)
    changed = commit(plan.site, plan.staged, plan.targets)
    labels = {"applies": "applied", "applied": "skipped (already applied)", "partial": "completed (was cut off)"}
    for outcome in plan.outcomes:
        say(f"  {labels[outcome.state]:26s} {outcome.patch.name}", quiet)
    applied = sum(o.state != "applied" for o in plan.outcomes)
    say(f"{applied} patch(es) applied, {len(plan.outcomes) - applied} already applied; "
        f"{len(changed)} file(s) changed", quiet)
    return EXIT_OK


def partial_note(outcome: Outcome) -> str:
    """What a 'partial' patch holds, and the two ways out."""
    missing = [rel for rel in outcome.patch.targets if rel not in outcome.holding]
    return (f": in {', '.join(outcome.holding)} only, not {', '.join(missing)} (a run was cut off; "
            f"{PROG} completes it, {PROG} --revert undoes it)")


def cmd_check(manager: Manager, plan: Plan, quiet: bool) -> int:
    labels = {"applies": "would apply", "applied": "applied", "conflicts": "CONFLICTS", "partial": "would complete"}
    for outcome in plan.outcomes:
        extra = f": {outcome.conflict}" if outcome.conflict else partial_note(outcome) if outcome.holding else ""
        print(f"  {labels[outcome.state]:12s} {outcome.patch.name}{extra}")
    if plan.conflicts:
        for outcome in plan.conflicts:
            print(outcome.details, file=sys.stderr)
        return EXIT_CONFLICT
    say("nothing was changed", quiet)
    return EXIT_OK


def cmd_status(manager: Manager, plan: Plan, target: Path | None) -> int:
    labels = {"applies": "not applied", "applied": "applied", "conflicts": "conflicts", "partial": "partial"}
    for outcome in plan.outcomes:
        extra = partial_note(outcome) if outcome.state == "partial" else ""
        print(f"{labels[outcome.state]:12s} {outcome.patch.name}{extra}")
    problem = rft_problem(target)
    print(f"{'rft':12s} {problem or f'import rft finds this checkout ({CHECKOUT})'}")
    if plan.conflicts:
        return EXIT_CONFLICT
    if any(o.state != "applied" for o in plan.outcomes):
        return EXIT_NOT_APPLIED
    return EXIT_RFT_ELSEWHERE if problem else EXIT_OK


def cmd_revert(manager: Manager, plan: Plan, quiet: bool) -> int:
    changed = commit(plan.site, plan.pristine, plan.targets)
    labels = {"applied": "reverted", "partial": "reverted (was cut off)"}
    for outcome in reversed(plan.outcomes):
        say(f"  {labels.get(outcome.state, 'skipped (not applied)'):26s} {outcome.patch.name}", quiet)
    for rel, digest in manager.manifest.items():  # the install itself, after writing
        if sha256(plan.site / rel) != digest:
            raise PatchError(EXIT_WRITE, f"{plan.site / rel}: still differs from the manifest after --revert")
    say(f"{len(changed)} file(s) restored; every target matches patches/MANIFEST.sha256", quiet)
    return EXIT_OK


def cmd_export(manager: Manager, plan: Plan, dest: Path, upto: str | None, quiet: bool) -> int:
    if dest.exists() and any(dest.iterdir()):
        raise PatchError(EXIT_USAGE, f"{dest}: exists and is not empty; choose a new directory")
    count = len(manager.series)
    if upto is not None:
        if upto not in manager.names:
            raise PatchError(EXIT_USAGE, f"--upto {upto}: not in {manager.series_file}")
        count = manager.names.index(upto) + 1
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(plan.site / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with scratch_dir() as tmp:
        manager.stage_up_to(plan, Path(tmp), count)
        manager.copy_targets(dest, source_root=Path(tmp))
    names = ", ".join(manager.names[:count]) or "none"
    say(f"{dest / PACKAGE}: pristine {PACKAGE} {VERSION} with {count} patch(es) applied ({names}); "
        f"edit it, then: {PROG} --make NAME.patch --from {dest}", quiet)
    return EXIT_OK


def dep3_header(description: str, today: str) -> str:
    """A DEP-3 header: Description (first line a summary), Forwarded, Last-Update, then '---'."""
    lines = [line.rstrip() for line in description.strip().splitlines()]
    body = "".join(f" {line}\n" if line else " .\n" for line in lines[1:])
    return f"Description: {lines[0]}\n{body}Forwarded: not-needed\nLast-Update: {today}\n---\n"


def existing_header(path: Path, today: str) -> str:
    """The header of an existing patch, with Last-Update set to today."""
    header = []
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith(("--- a/", "diff ", "Index: ")):
            break
        header.append(f"Last-Update: {today}\n" if line.startswith("Last-Update:") else line)
    return "".join(header)


_STAT_LINE = re.compile(r"^ (\S+ +\| +\d+ [+-]*|\d+ files? changed.*)$")


def diffstat(body: str) -> str:
    """``git apply --stat``'s summary of a unified diff: one line a file, then the totals."""
    rows: list[list] = []
    for line in body.splitlines():
        if line.startswith("+++ "):
            rows.append([line[4:].split("\t")[0].removeprefix("b/"), 0, 0])
        elif rows and line.startswith("+"):
            rows[-1][1] += 1
        elif rows and line.startswith("-") and not line.startswith("--- "):
            rows[-1][2] += 1
    width = max((len(name) for name, _, _ in rows), default=0)
    out = [f" {name.ljust(width)} | {add + rem:4d} {'+' * add}{'-' * rem}" for name, add, rem in rows]
    adds, rems = sum(r[1] for r in rows), sum(r[2] for r in rows)
    total = f" {len(rows)} file{'s' if len(rows) != 1 else ''} changed"
    total += f", {adds} insertion{'s' if adds != 1 else ''}(+)" if adds else ""
    total += f", {rems} deletion{'s' if rems != 1 else ''}(-)" if rems else ""
    return "\n".join(out + [total]) + "\n"


def with_diffstat(header: str, body: str) -> str:
    """``header`` (DEP-3 fields, maybe an old diffstat, then '---') with the diffstat of ``body``."""
    lines = header.splitlines()
    while lines and (lines[-1] in ("---", "") or _STAT_LINE.match(lines[-1])):
        lines.pop()
    return "\n".join(lines) + "\n\n" + diffstat(body) + "---\n"


def cmd_make(
    manager: Manager, plan: Plan, name: str, edited: Path, description: str | None, after: str | None, quiet: bool
) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.patch", name):
        raise PatchError(EXIT_USAGE, f"--make {name}: give a file name like my_fix.patch (no directory)")
    if not (edited / PACKAGE).is_dir():
        raise PatchError(EXIT_USAGE, f"--from {edited}: no {PACKAGE}/ inside; use the directory --export made")
    out = manager.patches / name
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if out.exists():
        header = existing_header(out, today)
    elif description:
        header = dep3_header(description, today)
    else:
        raise PatchError(EXIT_USAGE, f"{name} is new: give --description 'what it changes and why'")
    if name in manager.names:
        if after is not None:
            raise PatchError(EXIT_USAGE, f"{name} is in the series already; its place there sets the base, drop --after")
        position = manager.names.index(name)
    elif after is not None:
        if after not in manager.names:
            raise PatchError(EXIT_USAGE, f"--after {after}: not in {manager.series_file}")
        position = manager.names.index(after) + 1
    else:
        position = len(manager.series)
    with scratch_dir() as tmp:
        base = manager.stage_up_to(plan, Path(tmp) / "base", position)
        diff, outside = [], []
        for path in sorted((edited / PACKAGE).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(edited).as_posix()
            original = base / rel if rel in manager.manifest else plan.site / rel
            if not original.is_file():
                raise PatchError(EXIT_USAGE, f"{path}: a new file; patches may only change existing files")
            if original.read_bytes() == path.read_bytes():
                continue
            if rel not in manager.manifest:
                outside.append(rel)
                continue
            proc = subprocess.run(
                ["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}", str(original), str(path)],
                capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=False,
            )
            if proc.returncode != 1:
                raise PatchError(EXIT_USAGE, f"diff failed on {rel}: {proc.stderr.strip()}")
            diff.append(proc.stdout)
        if outside:
            raise PatchError(
                EXIT_USAGE,
                f"{outside[0]} changed but patches/MANIFEST.sha256 does not list it; add its pristine sha256 "
                f"(sha256sum {outside[0]}, run in a fresh site-packages) and run --make again",
            )
        if not diff:
            raise PatchError(EXIT_USAGE, f"{edited}: no change against the series before {name}; nothing written")
        write_atomic(out, (with_diffstat(header, "".join(diff)) + "".join(diff)).encode())
    hunks = sum(line.startswith("@@ ") for text in diff for line in text.splitlines())
    say(f"wrote {out} ({len(diff)} file(s), {hunks} hunk(s))", quiet)
    if name not in manager.names:
        place = f"after {after}" if after else "at the end"
        say(f"add it to {manager.series_file} {place}, then run {PROG} --check", quiet)
    else:
        later = verify_series_from_pristine(manager, plan)
        if later:
            print(f"{PROG}: warning: {later}", file=sys.stderr)
    return EXIT_OK


def verify_series_from_pristine(manager: Manager, plan: Plan) -> str:
    """'' when the whole (re-read) series applies to pristine files in order, else the problem."""
    fresh = Manager(manager.patches, manager.site, manager.series_file)
    with scratch_dir() as tmp:
        tree = fresh.copy_targets(Path(tmp), source_root=plan.pristine)
        for patch in fresh.series:
            outcome = try_apply(tree, patch)
            if outcome.state == "conflicts":
                return f"{outcome.conflict}: remake it against the new series (--export --upto {patch.name})"
    return ""


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            f"Apply rft's patches (patches/series) to the {PACKAGE} {VERSION} that PYTHON imports "
            f"(default: python on PATH), all or nothing; a second run changes nothing."
        ),
        epilog=EXIT_CODES
        + f"""

making a patch:
  {PROG} --export /tmp/edit [--upto NAME.patch]   # pristine + series (up to NAME) to edit
  ...edit /tmp/edit/{PACKAGE}/...
  {PROG} --make NAME.patch --from /tmp/edit [--description 'what and why'] [--after EARLIER.patch]""",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="say what would apply, is applied or conflicts; change nothing")
    mode.add_argument("--status", action="store_true", help="one line per patch (applied / not applied / partial / "
                      "conflicts), then whether import rft in PYTHON finds this checkout")
    mode.add_argument("--revert", action="store_true", help="reverse the applied patches (last first) back to pristine")
    mode.add_argument("--export", metavar="DIR", type=Path, help="write pristine openrlhf plus the series into DIR")
    mode.add_argument("--make", metavar="NAME.patch", help="write patches/NAME.patch from the edited tree of --from")
    parser.add_argument("--upto", metavar="NAME.patch", help="with --export: apply the series only up to NAME")
    parser.add_argument("--after", metavar="NAME.patch", help="with --make for a patch not yet in the series: "
                        "it goes right after NAME (default: at the end), so its base is the series up to NAME")
    parser.add_argument("--from", dest="edited", metavar="DIR", type=Path, help="with --make: the edited tree")
    parser.add_argument("--description", help="with --make for a new patch: its DEP-3 Description")
    parser.add_argument("--target", metavar="DIR", help="site-packages-like directory holding openrlhf/ "
                        "(default: where PYTHON imports it from)")
    parser.add_argument("--series", type=Path, help="series file (default: patches/series)")
    parser.add_argument("--patches", type=Path, default=Path(__file__).resolve().parents[1] / "patches",
                        help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.make and args.edited is None:
        parser.error("--make needs --from DIR (the tree made by --export and edited)")
    if (args.upto and not args.export) or ((args.edited or args.after or args.description) and not args.make):
        parser.error("--upto goes with --export; --from, --after and --description with --make")
    try:
        with interruptible():
            return run_command(args)
    except PatchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if exc.details:
            print(exc.details.rstrip(), file=sys.stderr)
        return exc.code
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"{PROG}: interrupted by {signal.Signals(signum).name}; every file is whole, and the install holds "
              f"the series as before or complete: run the command again to finish, --status to see", file=sys.stderr)
        return EXIT_SIGNAL + signum


def run_command(args: argparse.Namespace) -> int:
    """The command of ``args``, with the install locked and a scratch folder that always goes."""
    target = Path(args.target).resolve() if args.target else None
    site = find_site(args.target)
    manager = Manager(args.patches.resolve(), site, args.series.resolve() if args.series else None)
    remove_dead_scratch()
    with locked(site), scratch_dir() as scratch:
        writes = not (args.check or args.status or args.export or args.make)
        if writes:
            removed = remove_leftovers(site, list(manager.manifest))
            if removed:
                say(f"removed {len(removed)} temp file(s) a killed run left: {removed[0].name}", args.quiet)
        manager.check_environment()
        if not (args.quiet or args.status):
            print(f"{PACKAGE} {VERSION} at {site}", flush=True)
        plan = manager.plan(Path(scratch))
        if args.check:
            return cmd_check(manager, plan, args.quiet)
        if args.status:
            return cmd_status(manager, plan, target)
        if args.revert:
            return cmd_revert(manager, plan, args.quiet)
        if args.export:
            return cmd_export(manager, plan, args.export.resolve(), args.upto, args.quiet)
        if args.make:
            return cmd_make(manager, plan, args.make, args.edited.resolve(), args.description, args.after, args.quiet)
        problem = rft_problem(target)
        if problem:
            print(f"{PROG}: warning: {problem} (the patched {PACKAGE} imports rft)", file=sys.stderr)
        return cmd_apply(manager, plan, args.quiet)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before main's handlers are in place
        print(f"{PROG}: interrupted by SIGINT; nothing was changed", file=sys.stderr)
        sys.exit(EXIT_SIGNAL + signal.SIGINT)
    except BrokenPipeError:  # output piped into head and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
