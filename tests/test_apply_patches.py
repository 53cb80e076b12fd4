"""apply_patches.sh on fresh copies of the pristine openrlhf 0.9.3 install (site-packages-like dirs).

Apply / re-apply / check / status / revert, the version and pristine-file guards, all-or-nothing
on a conflicting patch and on a failed write, patch making, and the manifest against the wheel's
RECORD. Every run goes through the real script with ``--target DIR``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import oprl

SCRIPT = oprl.REPO / "apply_patches.sh"
MANIFEST = oprl.PATCHES / "MANIFEST.sha256"


def manifest() -> dict[str, str]:
    rows = {}
    for line in MANIFEST.read_text().splitlines():
        digest, rel = line.split()
        rows[rel] = digest
    return rows


def make_site(dest: Path) -> Path:
    """A site-packages-like copy: pristine openrlhf/ plus its dist-info (holding the version)."""
    oprl.pristine_copy(dest)
    for dist_info in oprl.SITE.glob("openrlhf-*.dist-info"):
        shutil.copytree(dist_info, dest / dist_info.name)
    return dest


@pytest.fixture
def site(tmp_path) -> Path:
    return make_site(tmp_path / "site")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, **(env or {})},
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime (a rewrite with equal bytes shows too)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def litter(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.suffix in (".orig", ".rej", ".tmp") or p.name.startswith(".")]


def compile_all(site: Path) -> None:
    """Bytecode for every module of the copy, as an import would leave it."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site / "openrlhf")], check=True)


def stale_bytecode(site: Path) -> list[str]:
    """.pyc files whose header no longer matches their source's mtime and size (Python's own test)."""
    stale = []
    for pyc in site.rglob("__pycache__/*.pyc"):
        source = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
        header, stat = pyc.read_bytes()[:16], source.stat()
        if int.from_bytes(header[8:12], "little") != int(stat.st_mtime) & 0xFFFFFFFF or (
            int.from_bytes(header[12:16], "little") != stat.st_size & 0xFFFFFFFF
        ):
            stale.append(pyc.relative_to(site).as_posix())
    return stale


def patched_by_hand(dest: Path, series: Path) -> Path:
    """The series applied with plain patch(1), independently of the manager, for comparison."""
    make_site(dest)
    for name in oprl.series_names(series):
        subprocess.run(
            ["patch", "-p1", "-F", "0", "-N", "-s", "-d", str(dest), "-i", str(series.parent / name)],
            check=True,
            env={"LC_ALL": "C", "PATH": os.environ["PATH"]},
        )
    return dest


def own_series(tmp_path: Path, names: list[str], extra: dict[str, str] | None = None) -> Path:
    """A series file in tmp_path listing ``names`` (copied from patches/) plus ``extra`` patches."""
    folder = tmp_path / "patches"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(oprl.PATCHES / name, folder / name)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    series = folder / "series"
    series.write_text("# test series\n" + "".join(f"{n}\n" for n in names + list(extra or {})))
    return series


RFT_HERE = f"rft          import rft finds this checkout ({oprl.REPO})"
"""--status's last line when the training interpreter imports rft from this checkout."""

MY_PATCHES = ["offload_cli.patch", "ratio_logging_loss.patch", "experience_maker.patch"]


def test_apply_reapply_check_status_revert(site, tmp_path):
    series = oprl.PATCHES / "series"
    names = oprl.series_names(series)
    pristine = snapshot(site)

    status = run("--target", str(site), "--status")
    assert status.returncode == 5, status.stderr
    assert status.stdout.splitlines() == [f"not applied  {n}" for n in names] + [RFT_HERE]

    check = run("--target", str(site), "--check")
    assert check.returncode == 0, check.stderr
    assert all(f"would apply  {n}" in check.stdout for n in names)
    assert snapshot(site) == pristine

    first = run("--target", str(site))
    assert first.returncode == 0, first.stderr
    assert sum("  applied " in line for line in first.stdout.splitlines()) == len(names)
    expected = patched_by_hand(tmp_path / "by_hand", series)
    for rel in manifest():
        assert (site / rel).read_bytes() == (expected / rel).read_bytes(), rel
    after_first = snapshot(site)

    second = run("--target", str(site))
    assert second.returncode == 0, second.stderr
    assert [line.split()[-1] for line in second.stdout.splitlines() if "already applied)" in line] == names
    assert snapshot(site) == after_first  # not one byte, not one mtime

    status = run("--target", str(site), "--status")
    assert status.returncode == 0 and status.stdout.splitlines() == [f"applied      {n}" for n in names] + [RFT_HERE]

    revert = run("--target", str(site), "--revert")
    assert revert.returncode == 0, revert.stderr
    assert [line.split()[-1] for line in revert.stdout.splitlines() if "reverted" in line] == names[::-1]
    assert {k: v[0] for k, v in snapshot(site).items()} == {k: v[0] for k, v in pristine.items()}
    assert litter(site) == []

    again = run("--target", str(site), "--revert")
    assert again.returncode == 0 and "0 file(s) restored" in again.stdout


def test_stacked_series_half_applied_is_completed(site, tmp_path):
    """A site holding the first patches of a longer series gets only the missing ones."""
    short = own_series(tmp_path / "short", MY_PATCHES[:2])
    assert run("--target", str(site), "--series", str(short)).returncode == 0
    full = own_series(tmp_path / "full", MY_PATCHES)
    proc = run("--target", str(site), "--series", str(full))
    assert proc.returncode == 0, proc.stderr
    assert "skipped (already applied)  offload_cli.patch" in proc.stdout
    assert "applied                    experience_maker.patch" in proc.stdout


APPEND_ONLY = """Description: add a line at the end of loss.py
Forwarded: not-needed
Last-Update: 2026-11-25
---
--- a/openrlhf/models/loss.py
+++ b/openrlhf/models/loss.py
@@ -434,3 +434,4 @@
{tail}+RFT_APPENDED = True
"""


def test_append_only_patch_is_not_applied_twice(site, tmp_path):
    """patch(1) would happily apply an append-only hunk again; the manifest says it is applied."""
    tail = "".join(" " + line + "\n" for line in (site / "openrlhf/models/loss.py").read_text().splitlines()[-3:])
    series = own_series(tmp_path, [], {"append.patch": APPEND_ONLY.format(tail=tail)})
    assert run("--target", str(site), "--series", str(series)).returncode == 0
    once = (site / "openrlhf/models/loss.py").read_text()
    assert once.count("RFT_APPENDED") == 1
    second = run("--target", str(site), "--series", str(series))
    assert second.returncode == 0 and "already applied" in second.stdout
    assert (site / "openrlhf/models/loss.py").read_text() == once


CONFLICTING = """Description: a hunk whose context is not in 0.9.3
Forwarded: not-needed
Last-Update: 2026-11-25
---
--- a/openrlhf/trainer/ppo_trainer.py
+++ b/openrlhf/trainer/ppo_trainer.py
@@ -1,3 +1,4 @@
 this line is not in ppo_trainer.py
+added
 nor is this one
 or this one
"""


def test_conflicting_patch_leaves_every_file_byte_identical(site, tmp_path):
    # Valid patches before the conflicting one: they must not be written either.
    series = own_series(tmp_path, MY_PATCHES, {"zz_conflict.patch": CONFLICTING})
    before = snapshot(site)
    proc = run("--target", str(site), "--series", str(series))
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert "zz_conflict.patch" in first and "openrlhf/trainer/ppo_trainer.py" in first and "hunk #1" in first
    assert "nothing was changed" in first
    assert "this line is not in ppo_trainer.py" in proc.stderr  # the rejected hunk is shown
    assert snapshot(site) == before
    assert litter(site) == []

    check = run("--target", str(site), "--series", str(series), "--check")
    assert check.returncode == 1 and "CONFLICTS    zz_conflict.patch" in check.stdout
    status = run("--target", str(site), "--series", str(series), "--status")
    assert status.returncode == 1 and "conflicts    zz_conflict.patch" in status.stdout
    assert snapshot(site) == before


def test_failed_write_restores_every_file(site, monkeypatch, capsys):
    """The second file write fails: the first is restored and the install is unchanged."""
    sys.path.insert(0, str(oprl.REPO))
    try:
        from rft import patching
    finally:
        sys.path.remove(str(oprl.REPO))
    before = snapshot(site)
    real_write, calls = patching.write_atomic, []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(patching, "write_atomic", failing_write)
    code = patching.main(["--target", str(site), "--series", str(oprl.PATCHES / "series")])
    assert code == 4
    assert "No space left on device" in capsys.readouterr().err
    assert len(calls) == 3  # first write, failed write, restore of the first
    assert {k: v[0] for k, v in snapshot(site).items()} == {k: v[0] for k, v in before.items()}


def import_patching():
    sys.path.insert(0, str(oprl.REPO))
    try:
        from rft import patching
    finally:
        sys.path.remove(str(oprl.REPO))
    return patching


def test_interrupt_during_writes_restores_every_file(site, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) raised by the second write: the first file is restored too, and one line says so."""
    patching = import_patching()
    before = snapshot(site)
    real_write, calls = patching.write_atomic, []

    def interrupted_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(patching, "write_atomic", interrupted_write)
    code = patching.main(["--target", str(site), "--series", str(oprl.PATCHES / "series"), "--quiet"])
    assert code == 130
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("apply_patches.sh: interrupted by SIGINT;")
    assert len(calls) == 3  # first write, interrupted write, restore of the first
    assert {k: v[0] for k, v in snapshot(site).items()} == {k: v[0] for k, v in before.items()}
    assert litter(site) == []


def test_failed_restore_is_reported_not_hidden(site, monkeypatch, capsys):
    """Every write fails after the first: the error says in its one line that the install is half-written."""
    patching = import_patching()
    real_write, calls = patching.write_atomic, []

    def failing_after_first(path, data):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(patching, "write_atomic", failing_after_first)
    code = patching.main(["--target", str(site), "--series", str(oprl.PATCHES / "series"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1
    assert "0 file(s) restored, INSTALL HALF-WRITTEN, not restored: " in err[0] and str(calls[0]) in err[0]


def test_signal_during_writes_waits_until_every_file_is_written(site, tmp_path, monkeypatch):
    """SIGINT arriving mid-write is held until the whole set and its bytecode are written, then delivered."""
    patching = import_patching()
    real_write, calls = patching.write_atomic, []

    compile_all(site)

    def write_then_signal(path, data):
        calls.append(path)
        real_write(path, data)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(patching, "write_atomic", write_then_signal)
    code = patching.main(["--target", str(site), "--series", str(oprl.PATCHES / "series"), "--quiet"])
    assert code == 130
    assert stale_bytecode(site) == []
    expected = patched_by_hand(tmp_path / "by_hand", oprl.PATCHES / "series")
    assert len(calls) == len(manifest())
    for rel in manifest():
        assert (site / rel).read_bytes() == (expected / rel).read_bytes(), rel
    assert litter(site) == []


def test_wrong_version_is_refused(site):
    metadata = next(site.glob("openrlhf-*.dist-info")) / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.9.3", "Version: 0.9.4"))
    before = snapshot(site)
    proc = run("--target", str(site))
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "0.9.4 is installed" in proc.stderr and "openrlhf==0.9.3" in proc.stderr
    assert snapshot(site) == before


def test_missing_dist_info_is_refused(site):
    shutil.rmtree(next(site.glob("openrlhf-*.dist-info")))
    proc = run("--target", str(site))
    assert proc.returncode == 3 and "dist-info" in proc.stderr


def test_modified_target_file_is_refused(site):
    loss = site / "openrlhf/models/loss.py"
    loss.write_text(loss.read_text() + "# edited by hand\n")
    before = snapshot(site)
    proc = run("--target", str(site))
    assert proc.returncode == 3
    assert "openrlhf/models/loss.py: not the pristine openrlhf 0.9.3 file" in proc.stderr
    assert snapshot(site) == before
    assert run("--target", str(site), "--revert").returncode == 3
    assert snapshot(site) == before


def test_series_naming_an_unlisted_file_is_refused(site, tmp_path):
    text = CONFLICTING.replace("trainer/ppo_trainer.py", "utils/utils.py")
    proc = run("--target", str(site), "--series", str(own_series(tmp_path, [], {"x.patch": text})))
    assert proc.returncode == 2 and "MANIFEST.sha256 does not list" in proc.stderr


def test_finds_the_install_of_the_active_python(site):
    """Without --target: where PYTHON imports openrlhf from (here a copy first on PYTHONPATH)."""
    proc = run("--status", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 5, proc.stderr
    proc = run("--check", env={"PYTHONPATH": str(site)})
    assert proc.stdout.splitlines()[0] == f"openrlhf 0.9.3 at {site.resolve()}"


def test_help_documents_exit_codes():
    proc = run("--help")
    assert proc.returncode == 0
    for code in ("0", "1", "2", "3", "4", "5", "6", "130, 129, 143"):
        assert f"\n  {code}  " in proc.stdout
    assert "--revert" in proc.stdout and "--make" in proc.stdout


def test_no_python_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--status"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")},
    )
    assert proc.returncode == 3 and "set PYTHON=" in proc.stderr


def copy_patches_dir(dest: Path) -> Path:
    shutil.copytree(oprl.PATCHES, dest)
    return dest


def make_cmd(patches: Path, *args: str) -> subprocess.CompletedProcess:
    """The manager with a private copy of patches/ (the hidden --patches option)."""
    return run(*args, "--patches", str(patches))


def test_export_and_make_reproduce_a_committed_patch(site, tmp_path):
    """Refreshing ratio_logging_loss.patch from its own export writes the committed patch again."""
    patches = copy_patches_dir(tmp_path / "patches")
    edit = tmp_path / "edit"
    proc = make_cmd(patches, "--target", str(site), "--export", str(edit), "--upto", "ratio_logging_loss.patch")
    assert proc.returncode == 0, proc.stderr
    assert (edit / "openrlhf/models/loss.py").read_bytes() == (
        patched_by_hand(tmp_path / "ref", own_series(tmp_path / "s", MY_PATCHES[:2])) / "openrlhf/models/loss.py"
    ).read_bytes()
    (patches / "ratio_logging_loss.patch").unlink()
    shutil.copy(oprl.PATCHES / "ratio_logging_loss.patch", patches / "ratio_logging_loss.patch")
    proc = make_cmd(patches, "--target", str(site), "--make", "ratio_logging_loss.patch", "--from", str(edit))
    assert proc.returncode == 0, proc.stderr

    def body(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("Last-Update:")]

    assert body(patches / "ratio_logging_loss.patch") == body(oprl.PATCHES / "ratio_logging_loss.patch")


def test_make_a_new_patch_then_apply_it(site, tmp_path):
    patches = copy_patches_dir(tmp_path / "patches")
    edit = tmp_path / "edit"
    assert make_cmd(patches, "--target", str(site), "--export", str(edit)).returncode == 0

    empty = make_cmd(patches, "--target", str(site), "--make", "new.patch", "--from", str(edit), "--description", "x")
    assert empty.returncode == 2 and "no change" in empty.stderr and not (patches / "new.patch").exists()

    trainer = edit / "openrlhf/trainer/ppo_trainer.py"
    trainer.write_text(trainer.read_text().replace("import time\n", "import time  # rft\n", 1))
    nodesc = make_cmd(patches, "--target", str(site), "--make", "new.patch", "--from", str(edit))
    assert nodesc.returncode == 2 and "--description" in nodesc.stderr

    proc = make_cmd(
        patches, "--target", str(site), "--make", "new.patch", "--from", str(edit),
        "--description", "Mark the trainer\nWhy: a test.",
    )
    assert proc.returncode == 0, proc.stderr
    text = (patches / "new.patch").read_text()
    assert text.startswith("Description: Mark the trainer\n Why: a test.\nForwarded: not-needed\nLast-Update: ")
    assert "\n--- a/openrlhf/trainer/ppo_trainer.py\n+++ b/openrlhf/trainer/ppo_trainer.py\n" in text
    assert "+import time  # rft\n" in text

    series = patches / "series"
    series.write_text(series.read_text() + "new.patch\n")
    applied = make_cmd(patches, "--target", str(site))
    assert applied.returncode == 0, applied.stderr
    assert (site / "openrlhf/trainer/ppo_trainer.py").read_bytes() == trainer.read_bytes()


def test_make_refuses_files_outside_the_manifest(site, tmp_path):
    patches = copy_patches_dir(tmp_path / "patches")
    edit = tmp_path / "edit"
    assert make_cmd(patches, "--target", str(site), "--export", str(edit)).returncode == 0
    (edit / "openrlhf/utils/utils.py").write_text("# changed\n")
    proc = make_cmd(patches, "--target", str(site), "--make", "u.patch", "--from", str(edit), "--description", "u")
    assert proc.returncode == 2 and "openrlhf/utils/utils.py" in proc.stderr


def test_patches_carry_a_dep3_header_and_a_b_paths():
    for name in oprl.series_names():
        text = (oprl.PATCHES / name).read_text()
        header = text.split("\n--- a/", 1)[0]
        assert header.startswith("Description: "), name
        forwarded = [line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("Forwarded:")]
        # DEP-3: not-needed (rft's own concern), no (upstream should take it, not sent yet), or a URL
        assert len(forwarded) == 1 and (forwarded[0] in ("not-needed", "no") or "://" in forwarded[0]), name
        assert "\nLast-Update: " in header, name
        for line in text.splitlines():
            if line.startswith("+++ "):
                assert line.startswith("+++ b/openrlhf/"), (name, line)


def record_digest(hex_digest: str) -> str:
    """A hex sha256 as wheel RECORD files write it (urlsafe base64, no padding)."""
    return base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode()


def test_manifest_matches_the_wheel_record():
    """patches/MANIFEST.sha256 against the RECORD that pip installed from the PyPI wheel."""
    record = next(oprl.SITE.glob("openrlhf-0.9.3.dist-info")) / "RECORD"
    hashes = {}
    for line in record.read_text().splitlines():
        path, digest, _size = line.rsplit(",", 2)
        if digest.startswith("sha256="):
            hashes[path] = digest[len("sha256="):]
    rows = manifest()
    assert len(rows) >= 9
    for rel, digest in rows.items():
        assert hashes[rel] == record_digest(digest), rel


def test_make_after_places_a_new_patch_inside_the_series(site, tmp_path):
    """save_model.patch made anew after offload_cli.patch: the same diff as the committed one."""
    patches = copy_patches_dir(tmp_path / "patches")
    (patches / "save_model.patch").unlink()
    series = patches / "series"
    series.write_text(series.read_text().replace("save_model.patch\n", ""))
    edit = tmp_path / "edit"
    proc = make_cmd(patches, "--target", str(site), "--export", str(edit), "--upto", "offload_cli.patch")
    assert proc.returncode == 0, proc.stderr
    subprocess.run(
        ["patch", "-p1", "-s", "-d", str(edit), "-i", str(oprl.PATCHES / "save_model.patch")],
        check=True, env={"LC_ALL": "C", "PATH": os.environ["PATH"]},
    )
    proc = make_cmd(
        patches, "--target", str(site), "--make", "save_model.patch", "--after", "offload_cli.patch",
        "--from", str(edit), "--description", "Wire --offload; keep LoRA saves to the adapter",
    )
    assert proc.returncode == 0, proc.stderr
    assert "after offload_cli.patch" in proc.stdout

    def diff_part(path: Path) -> str:
        text = path.read_text()
        return text[text.index("\n--- a/") :]

    assert diff_part(patches / "save_model.patch") == diff_part(oprl.PATCHES / "save_model.patch")


# ---------------------------------------------------------------- the installed distribution


def test_a_0_9_4_init_under_0_9_3_metadata_is_refused(site):
    """0.9.3's __init__.py is empty; RECORD says so, whatever METADATA says."""
    init = b'__version__ = "0.9.4"\n'
    (site / "openrlhf/__init__.py").write_bytes(init)
    before = snapshot(site)
    for args in ((), ("--status",), ("--revert",)):
        proc = run("--target", str(site), *args)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.strip().splitlines() == [  # e3b0c442...: the sha256 of an empty file
            f"apply_patches.sh: error: {site.resolve()}/openrlhf/__init__.py: differs from the openrlhf 0.9.3 file "
            f"its RECORD lists (sha256 {hashlib.sha256(init).hexdigest()[:16]}, RECORD e3b0c44298fc1c14): "
            "another release's or edited; pip install --no-deps --force-reinstall openrlhf==0.9.3"
        ]
    assert snapshot(site) == before


def test_a_module_that_record_does_not_list_is_refused(site):
    extra = site / "openrlhf/utils/new_in_0_9_4.py"
    extra.write_text("def helper():\n    return 1\n")
    proc = run("--target", str(site))
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"{extra.resolve()}: a module that the RECORD of openrlhf 0.9.3 does not list" in proc.stderr
    assert "pip install --no-deps --force-reinstall openrlhf==0.9.3" in proc.stderr
    assert (site / "openrlhf/models/loss.py").read_bytes() == (oprl.SITE / "openrlhf/models/loss.py").read_bytes()


def test_bytecode_and_non_module_files_are_not_unexpected(site):
    """__pycache__ (which RECORD may or may not list) and non-importable files do not count as modules."""
    compile_all(site)
    (site / "openrlhf/models/notes.txt").write_text("not a module\n")
    proc = run("--target", str(site), "--check")
    assert proc.returncode == 0, proc.stderr


def test_a_record_of_another_release_is_refused(site):
    """RECORD lists loss.py with a hash that is not the 0.9.3 wheel's: this dist-info is not 0.9.3's."""
    record = next(site.glob("openrlhf-*.dist-info")) / "RECORD"
    lines = record.read_text().splitlines()
    other = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    record.write_text("".join(
        (f"openrlhf/models/loss.py,sha256={other},1\n" if line.startswith("openrlhf/models/loss.py,") else line + "\n")
        for line in lines
    ))
    proc = run("--target", str(site), "--status")
    assert proc.returncode == 3
    assert proc.stderr.startswith(f"apply_patches.sh: error: {record.resolve()}: lists openrlhf/models/loss.py with "
                                  f"sha256 0000000000000000, the 0.9.3 wheel's is {manifest()['openrlhf/models/loss.py'][:16]}")
    record.unlink()
    proc = run("--target", str(site), "--status")
    assert proc.returncode == 3 and "RECORD: missing" in proc.stderr and len(proc.stderr.splitlines()) == 1


# ---------------------------------------------------------------- leftovers of a killed run


def test_apply_removes_the_temp_files_a_killed_run_left_and_nothing_else(site, tmp_path):
    folder = site / "openrlhf/models"
    ours = [folder / ".loss.py.rft-ab12cd_9.tmp", folder / ".loss.py.k3j4h5g6.tmp"]  # this version's, and older
    theirs = [folder / ".loss.py.swp", folder / ".other.py.k3j4h5g6.tmp", folder / "loss.py.k3j4h5g6.tmp"]
    for path in ours + theirs:
        path.write_text("x")
    assert run("--target", str(site), "--check").returncode == 0
    assert all(path.exists() for path in ours)  # --check changes nothing
    proc = run("--target", str(site))
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 temp file(s) a killed run left" in proc.stdout
    assert [path.exists() for path in ours + theirs] == [False, False, True, True, True]


def test_scratch_folders_of_dead_runs_are_removed(site, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmpdir / f"rft-patch-{int(dead.stdout)}-abcd1234"
    alive = tmpdir / f"rft-patch-{os.getpid()}-abcd1234"
    unrelated = tmpdir / "rft-patch-notapid"
    for folder in (gone, alive, unrelated):
        (folder / "pristine").mkdir(parents=True)
    proc = run("--target", str(site), "--status", env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 5, proc.stderr
    assert sorted(p.name for p in tmpdir.iterdir()) == sorted([alive.name, unrelated.name])


# ---------------------------------------------------------------- which rft the patched OpenRLHF imports


def test_status_says_when_import_rft_finds_another_checkout(site, tmp_path):
    """Another rft first on the training interpreter's path: --status 6 once the patches are applied."""
    other = tmp_path / "other"
    (other / "rft").mkdir(parents=True)
    (other / "rft/__init__.py").write_text("")
    env = {"PYTHONPATH": str(other)}
    applied = run("--target", str(site), env=env)
    assert applied.returncode == 0
    assert f"warning: import rft in {sys.executable} with {site.resolve()} first on sys.path finds " in applied.stderr
    proc = run("--target", str(site), "--status", env=env)
    assert proc.returncode == 6, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"rft          import rft in {sys.executable} with {site.resolve()} first on sys.path finds "
        f"{(other / 'rft').resolve()}, not this checkout; pip install -e {oprl.REPO}"
    )
    assert run("--target", str(site), "--status").returncode == 0  # the editable install finds this checkout


def test_status_flags_an_rft_inside_the_target_folder(site):
    (site / "rft").mkdir()
    (site / "rft/__init__.py").write_text("")
    assert run("--target", str(site)).returncode == 0
    proc = run("--target", str(site), "--status")
    assert proc.returncode == 6
    assert proc.stdout.splitlines()[-1].endswith(f"finds {(site / 'rft').resolve()}, inside the --target folder; "
                                                 "remove it there")


def test_status_of_the_environment_install_despite_the_hooks_package(site):
    """Run as a script from rft/, rft/openrlhf (the hooks) must not pass for the installed openrlhf."""
    assert (oprl.REPO / "rft/openrlhf/__init__.py").is_file()
    proc = run("--status", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.splitlines()[-1] == RFT_HERE
