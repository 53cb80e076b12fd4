"""The patch manager killed at every write point: the next run completes the series or undoes it.

Fault injection without a hook in the manager: a driver process imports ``rft.patching`` and
wraps the calls that change the install (``tempfile.mkstemp``, ``os.fsync``, ``os.chmod``,
``os.replace``, ``os.unlink`` of a path in it); after the Nth such call it sends itself a signal,
then runs the real ``main``. SIGKILL ends it on the spot; SIGINT, SIGTERM and SIGHUP must be held
until every file and its bytecode are written, then end the run with one line and 128 + the
signal's number. After each kill:

* no temp file of the manager is left in the install once a later run has run, nor a scratch
  folder in $TMPDIR, and no ``.pyc`` older than its source;
* ``--status`` reads the state (exit 0 or 5, never 3), ``apply`` completes the series and
  ``--revert`` gives back the pristine files, each checked against contents this file states.

The sweeps run on a small synthetic install (three files, three patches, one patch over two
files), so the expected states are literal text; one sweep runs the real series.
"""

from __future__ import annotations

import base64
import compileall
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import oprl
from rft import patching
from test_apply_patches import litter, patched_by_hand, snapshot, stale_bytecode

pytestmark = pytest.mark.slow

DRIVER = r"""
import os, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
from rft import patching
site, mode, kill_at, signum = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
count = 0

def point():
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signum)

def counted(real, on_site):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        where = str(kwargs.get("dir", args[0] if args else ""))
        if mode == "write" and (not on_site or where.startswith(site)):
            point()
        return result
    return wrapper

def counted_patch(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if mode == "patch" and args and args[0][0] == "patch":
            point()
        return result
    return wrapper

os.replace, os.chmod, os.unlink = (counted(os.replace, True), counted(os.chmod, True), counted(os.unlink, True))
os.fsync, tempfile.mkstemp = counted(os.fsync, False), counted(tempfile.mkstemp, True)
subprocess.run = counted_patch(subprocess.run)
code = patching.main(sys.argv[6:])
if kill_at == 0:
    print(f"points: {count}", file=sys.stderr)
sys.exit(code)
"""

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


# ---------------------------------------------------------------- a synthetic install

def numbered(name: str, changes: dict[int, str]) -> str:
    """Twenty lines ``<name>_<i> = <i>``; ``changes`` replaces some of them (far apart: one hunk each)."""
    return "".join(changes.get(i, f"{name}_{i} = {i}") + "\n" for i in range(20))


# Every state of every file: what the series does, written out (the patches are diffs of these).
A0, A1, A2 = numbered("a", {}), numbered("a", {2: "a_2 = 'p1'"}), numbered("a", {2: "a_2 = 'p1'", 15: "a_15 = 'p3'"})
B0, B1, B2 = numbered("b", {}), numbered("b", {3: "b_3 = 'p1'"}), numbered("b", {3: "b_3 = 'p1'", 16: "b_16 = 'p2'"})
C0, C1 = numbered("c", {}), numbered("c", {8: "c_8 = 'p3'\nc_extra = True"})
PRISTINE = {"openrlhf/a.py": A0, "openrlhf/b.py": B0, "openrlhf/sub/c.py": C0}
FINAL = {"openrlhf/a.py": A2, "openrlhf/b.py": B2, "openrlhf/sub/c.py": C1}
SERIES = {  # patch -> (file, before, after) for each file it changes
    "p1.patch": [("openrlhf/a.py", A0, A1), ("openrlhf/b.py", B0, B1)],
    "p2.patch": [("openrlhf/b.py", B1, B2)],
    "p3.patch": [("openrlhf/sub/c.py", C0, C1), ("openrlhf/a.py", A1, A2)],
}


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def unified_diff(rel: str, before: str, after: str, scratch: Path) -> str:
    """``diff -u`` of two states with a/ and b/ labels (diff(1), not the code under test)."""
    (scratch / "old").write_text(before)
    (scratch / "new").write_text(after)
    proc = subprocess.run(
        ["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}", str(scratch / "old"), str(scratch / "new")],
        capture_output=True, text=True, env={"LC_ALL": "C", "PATH": os.environ["PATH"]},
    )
    assert proc.returncode == 1, proc.stderr
    return proc.stdout


def synthetic(root: Path) -> tuple[Path, Path]:
    """A pristine synthetic install (site with openrlhf/ and a 0.9.3 dist-info) and its patches folder."""
    site, patches = root / "site", root / "patches"
    files = {**PRISTINE, "openrlhf/__init__.py": "", "openrlhf/sub/__init__.py": ""}
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / "openrlhf-0.9.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: openrlhf\nVersion: 0.9.3\n")
    rows = [f"{rel},{record_hash(text.encode())},{len(text.encode())}" for rel, text in files.items()]
    (info / "RECORD").write_text("\n".join(rows + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]) + "\n")
    patches.mkdir()
    (patches / "MANIFEST.sha256").write_text(
        "".join(f"{hashlib.sha256(text.encode()).hexdigest()}  {rel}\n" for rel, text in PRISTINE.items())
    )
    for name, changes in SERIES.items():
        body = "".join(unified_diff(rel, before, after, root) for rel, before, after in changes)
        (patches / name).write_text(f"Description: {name}\nForwarded: not-needed\nLast-Update: 2026-12-06\n---\n{body}")
    (patches / "series").write_text("".join(f"{name}\n" for name in SERIES))
    return site, patches


def contents(site: Path, rels) -> dict[str, str]:
    return {rel: (site / rel).read_text() for rel in rels}


# ---------------------------------------------------------------- running the manager

def kill_run(site: Path, patches: Path, tmpdir: Path, mode: str, kill_at: int, signum: int,
             *args: str) -> subprocess.CompletedProcess:
    """The manager in a driver process that signals itself after the ``kill_at``-th write (or patch(1) run)."""
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(oprl.REPO), str(site), mode, str(kill_at), str(int(signum)),
         "--target", str(site), "--patches", str(patches), "--quiet", *args],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], "TMPDIR": str(tmpdir), "LC_ALL": "C"},
    )


def count_points(site: Path, patches: Path, tmpdir: Path, mode: str, *args: str) -> int:
    """How many write points (or patch runs) one uninterrupted run has, on a throwaway copy of ``site``."""
    trial = site.parent / "count-points"
    shutil.copytree(site, trial)
    proc = kill_run(trial, patches, tmpdir, mode, 0, 0, *args)
    shutil.rmtree(trial)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1].split()[-1])


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch) -> Path:
    """$TMPDIR of every manager run here, for this process too, so that leftovers show."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def main_in_process(site: Path, patches: Path, *args: str) -> tuple[int, str]:
    """The real manager's main, in this process (what the next run after a kill does)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = patching.main(["--target", str(site), "--patches", str(patches), *args])
    return code, out.getvalue()


def assert_recovers(killed: Path, patches: Path, tmpdir: Path, pristine: dict[str, str], final: dict[str, str],
                    why: str) -> None:
    """From the state a kill left: --status reads it, apply completes it, --revert undoes it; nothing left over."""
    code, out = main_in_process(killed, patches, "--status")
    assert code in (0, 5), f"{why}: --status exit {code}: {out}"
    undo = killed.parent / f"{killed.name}-undo"
    shutil.copytree(killed, undo)
    code, out = main_in_process(killed, patches, "--quiet")
    assert code == 0, f"{why}: apply exit {code}: {out}"
    assert contents(killed, final) == final, why
    code, out = main_in_process(undo, patches, "--revert", "--quiet")
    assert code == 0, f"{why}: --revert exit {code}: {out}"
    assert contents(undo, pristine) == pristine, why
    for tree in (killed, undo):
        assert litter(tree) == [], why
        assert stale_bytecode(tree) == [], why
    assert list(tmpdir.iterdir()) == [], f"{why}: left in $TMPDIR: {list(tmpdir.iterdir())}"
    shutil.rmtree(undo)


def sweep(tmp_path: Path, tmpdir: Path, signame: str, start: dict[str, str], goal: dict[str, str],
          *args: str) -> tuple[int, int]:
    """Kill one run (from ``start`` towards ``goal``) at each write point in turn; (points tried, recovered)."""
    base, patches = synthetic(tmp_path / "synthetic")
    for rel, text in start.items():
        (base / rel).write_text(text)
    compileall.compile_dir(str(base / "openrlhf"), quiet=1)
    points = count_points(base, patches, tmpdir, "write", *args)
    assert points >= 3 * 4  # three files, each: temp file, fsync, chmod, rename (and bytecode)
    recovered = 0
    for kill_at in range(1, points + 1):
        why = f"{signame} after write {kill_at} of {points} ({' '.join(args) or 'apply'})"
        site = tmp_path / f"kill-{kill_at}"
        shutil.copytree(base, site)
        proc = kill_run(site, patches, tmpdir, "write", kill_at, SIGNALS[signame], *args)
        if signame == "SIGKILL":
            assert proc.returncode == -signal.SIGKILL, f"{why}: {proc.returncode} {proc.stderr}"
        else:
            # Held: the run finished every file and its bytecode, then stopped with one line.
            assert proc.returncode == 128 + SIGNALS[signame], f"{why}: {proc.returncode} {proc.stderr}"
            assert proc.stderr.splitlines() == [proc.stderr.strip()] and f"interrupted by {signame}" in proc.stderr
            assert contents(site, goal) == goal, why
            assert list(tmpdir.iterdir()) == [], why
            assert litter(site) == [], why
        assert stale_bytecode(site) == [], why
        assert_recovers(site, patches, tmpdir, PRISTINE, FINAL, why)
        shutil.rmtree(site)
        recovered += 1
    return points, recovered


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_apply_killed_at_any_write_is_completed_or_undone(tmp_path, own_tmpdir, signame):
    points, recovered = sweep(tmp_path, own_tmpdir, signame, PRISTINE, FINAL)
    assert recovered == points


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_revert_killed_at_any_write_is_completed_or_undone(tmp_path, own_tmpdir, signame):
    points, recovered = sweep(tmp_path, own_tmpdir, signame, FINAL, PRISTINE, "--revert")
    assert recovered == points


def test_a_patch_cut_in_two_is_partial_then_completed(tmp_path, own_tmpdir):
    """SIGKILL after p1's first file: --status says p1 is partial (exit 5); apply finishes it."""
    site, patches = synthetic(tmp_path / "synthetic")
    # Each file costs four write points (temp file, fsync, chmod, rename): a.py is whole after 4.
    proc = kill_run(site, patches, own_tmpdir, "write", 4, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (site / "openrlhf/a.py").read_text() == A2 and (site / "openrlhf/b.py").read_text() == B0
    code, out = main_in_process(site, patches, "--status")
    assert code == 5
    lines = out.splitlines()
    assert lines[0].startswith("partial      p1.patch: in openrlhf/a.py only, not openrlhf/b.py")
    assert "apply_patches.sh completes it, apply_patches.sh --revert undoes it" in lines[0]
    assert lines[1] == "not applied  p2.patch"
    assert lines[2].startswith("partial      p3.patch: in openrlhf/a.py only, not openrlhf/sub/c.py")
    code, out = main_in_process(site, patches)
    assert code == 0, out
    assert "completed (was cut off)    p1.patch" in out and "applied                    p2.patch" in out
    assert contents(site, FINAL) == FINAL


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_killed_while_planning_leaves_nothing_a_later_run_keeps(tmp_path, own_tmpdir, signame):
    """A kill during the scratch work (patch(1) runs): the install is untouched, the scratch folder goes."""
    base, patches = synthetic(tmp_path / "synthetic")
    runs = count_points(base, patches, own_tmpdir, "patch")
    for kill_at in sorted({1, runs // 2, runs}):
        site = tmp_path / f"kill-{kill_at}"
        shutil.copytree(base, site)
        before = snapshot(site)
        proc = kill_run(site, patches, own_tmpdir, "patch", kill_at, SIGNALS[signame])
        if signame != "SIGKILL":
            assert proc.returncode == 128 + SIGNALS[signame] and len(proc.stderr.splitlines()) == 1, proc.stderr
            assert list(own_tmpdir.iterdir()) == []
        assert snapshot(site) == before
        assert_recovers(site, patches, own_tmpdir, PRISTINE, FINAL, f"{signame} after patch run {kill_at}")


@pytest.mark.parametrize("operation", ["apply", "revert"])
def test_real_series_killed_between_any_two_files(tmp_path, own_tmpdir, operation):
    """The real series, SIGKILL after each rename: --status reads the state, apply and --revert finish."""
    from test_apply_patches import make_site, manifest

    rels = list(manifest())
    base = make_site(tmp_path / "base")
    pristine = contents(base, rels)
    final = contents(patched_by_hand(tmp_path / "by_hand", oprl.PATCHES / "series"), rels)
    patches = tmp_path / "patches"
    shutil.copytree(oprl.PATCHES, patches)
    args = ("--revert",) if operation == "revert" else ()
    if operation == "revert":
        for rel in rels:
            (base / rel).write_text(final[rel])
    points = count_points(base, patches, own_tmpdir, "write", *args)
    assert points == 4 * len(rels)  # every file changes: temp file, fsync, chmod, rename
    partial_seen = 0
    for kill_at in range(4, points, 4):  # after each rename but the last
        site = tmp_path / f"kill-{kill_at}"
        shutil.copytree(base, site)
        proc = kill_run(site, patches, own_tmpdir, "write", kill_at, signal.SIGKILL, *args)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        code, out = main_in_process(site, patches, "--status")
        partial_seen += "\npartial " in f"\n{out}"
        assert_recovers(site, patches, own_tmpdir, pristine, final, f"SIGKILL after write {kill_at} of {points}")
        shutil.rmtree(site)
    assert partial_seen >= 1  # a patch over several files was cut in two at least once


def waiting_for_flock(path: Path) -> bool:
    """True once some process waits for a flock on ``path`` (a '->' line of /proc/locks names its inode)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_waiting_for_the_lock_stops_in_one_line(tmp_path, signame):
    """apply_patches.sh blocked on another run's lock: Ctrl-C (or TERM, HUP) gives one line, 128+N, no scratch left."""
    import fcntl
    import time

    from test_apply_patches import make_site

    site = make_site(tmp_path / "site")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    before = snapshot(site)
    fd = os.open(site / "openrlhf", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the install
    try:
        proc = subprocess.Popen(
            ["bash", str(oprl.REPO / "apply_patches.sh"), "--target", str(site)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, "TMPDIR": str(tmpdir)},
        )
        deadline = time.monotonic() + 120
        while not waiting_for_flock(site / "openrlhf") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(SIGNALS[signame])
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == 128 + SIGNALS[signame], err
    assert err.splitlines() == [
        f"apply_patches.sh: interrupted by {signame}; every file is whole, and the install holds the series as "
        "before or complete: run the command again to finish, --status to see"
    ]
    assert snapshot(site) == before
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_real_series_signal_mid_write_finishes_then_stops_in_one_line(tmp_path, own_tmpdir, signame):
    """The real series, a signal halfway through the writes: all files, no stale bytecode, no scratch left."""
    from test_apply_patches import compile_all, make_site, manifest

    rels = list(manifest())
    site = make_site(tmp_path / "site")
    compile_all(site)
    final = contents(patched_by_hand(tmp_path / "by_hand", oprl.PATCHES / "series"), rels)
    points = count_points(site, oprl.PATCHES, own_tmpdir, "write")
    proc = kill_run(site, oprl.PATCHES, own_tmpdir, "write", points // 2, SIGNALS[signame])
    assert proc.returncode == 128 + SIGNALS[signame], proc.stderr
    assert proc.stderr.splitlines() == [
        f"apply_patches.sh: interrupted by {signame}; every file is whole, and the install holds the series as "
        "before or complete: run the command again to finish, --status to see"
    ]
    assert contents(site, rels) == final
    assert stale_bytecode(site) == [] and litter(site) == []
    assert list(own_tmpdir.iterdir()) == []
