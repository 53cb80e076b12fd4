"""scripts/spare_node_eval.sh driven end to end against a fake spare node.

``ssh``, ``scp``, ``rsync`` and ``tmux`` are replaced on PATH by small stand-ins
written here: ssh runs the remote command line with bash in a local directory that
plays the spare's home, scp/rsync copy into it, and tmux runs the session's
command at once. Git, bash and the script itself are real, so the test shows that
the code bundle arrives, that arguments survive two levels of shell quoting, and
that the log is where ``tail`` looks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "spare_node_eval.sh"

FAKES = {
    # ssh [opts] host command...: run the command in the fake home with the spare's login
    # shell ($FAKE_LOGIN_SHELL, bash unless a test picks dash).
    "ssh": r"""#!/usr/bin/env bash
set -euo pipefail
echo "ssh $*" >> "$FAKE_CALLS"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -i|-o|-p|-F|-l|-J) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift  # the host
cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec "${FAKE_LOGIN_SHELL:-bash}" -c "$*"
""",
    # scp [opts] src host:dst
    "scp": r"""#!/usr/bin/env bash
set -euo pipefail
echo "scp $*" >> "$FAKE_CALLS"
while [[ "$1" == -* ]]; do [[ "$1" == -i || "$1" == -o ]] && shift; shift; done
dst="${2#*:}"; [[ "$dst" == /* ]] || dst="$FAKE_HOME/$dst"
cp "$1" "$dst"
""",
    # rsync -az --partial -e CMD src/ host:dst/
    "rsync": r"""#!/usr/bin/env bash
set -euo pipefail
echo "rsync $*" >> "$FAKE_CALLS"
args=("$@"); src="${args[-2]}"; dst="${args[-1]#*:}"
[[ "$dst" == /* ]] || dst="$FAKE_HOME/$dst"
mkdir -p "$dst" && cp -a "$src". "$dst"
""",
    # tmux new-session -d -s NAME CMD: run CMD now with sh, as tmux would in the background.
    "tmux": r"""#!/usr/bin/env bash
set -euo pipefail
echo "tmux $*" >> "$FAKE_CALLS"
if [[ "$1" == new-session ]]; then sh -c "${*: -1}"; else echo "fake tmux: $*"; fi
""",
}


@pytest.fixture
def spare(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "spare_home"
    home.mkdir()
    # A local repository holding this script and an eval_posthoc.py that echoes its arguments.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / SCRIPT.name)
    (repo / "eval_posthoc.py").write_text("import json, sys\nprint('ARGV ' + json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_HOME": str(home),
        "FAKE_CALLS": str(tmp_path / "calls.log"),
        "SPARE_HOST": "someone@spare",
        "SSH_KEY": str(tmp_path / "key"),
        "REMOTE_PYTHON": sys.executable,
        "LOG_DIR": str(tmp_path / "logs"),
        "REMOTE_TMP": str(tmp_path),
    }
    return {"repo": repo, "home": home, "env": env, "git": git, "tmp": tmp_path}


def sh(spare, *args, **env):
    return subprocess.run(
        ["bash", str(spare["repo"] / "scripts" / SCRIPT.name), *args],
        capture_output=True, text=True, env={**spare["env"], **env}, cwd=spare["tmp"],
    )


def head(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_sync_code_clones_then_fast_forwards(spare):
    proc = sh(spare, "sync-code")
    assert proc.returncode == 0, proc.stderr
    remote_repo = spare["home"] / "Code" / "rft"
    assert head(remote_repo) == head(spare["repo"])
    assert f"spare HEAD: {head(spare['repo'])}" in proc.stdout and f"local HEAD: {head(spare['repo'])}" in proc.stdout
    assert (remote_repo / "eval_posthoc.py").is_file()
    # A new commit arrives as a fast-forward; the bundle is removed from the spare.
    (spare["repo"] / "NEW").write_text("x\n")
    subprocess.run([*spare["git"], "add", "NEW"], check=True)
    subprocess.run([*spare["git"], "commit", "-q", "-m", "two"], check=True)
    proc = sh(spare, "sync-code")
    assert proc.returncode == 0, proc.stderr
    assert head(remote_repo) == head(spare["repo"]) and (remote_repo / "NEW").is_file()
    assert not list(spare["tmp"].glob("rft-sync-*.bundle"))
    calls = (spare["tmp"] / "calls.log").read_text()
    assert f"-i {spare['tmp'] / 'key'}" in calls  # the identity file reaches ssh and scp


def test_start_passes_arguments_through_and_tail_reads_the_log(spare):
    assert sh(spare, "sync-code").returncode == 0
    args = ["--adapter", "a=/mnt/data/run x/step 10", "--modes", "greedy_pass@1,sampling_pass@8", "--note", "it's \"q\" $HOME `id` ; &&"]
    proc = sh(spare, "start", "--", *args)
    assert proc.returncode == 0, proc.stderr
    assert "started tmux session eval-posthoc" in proc.stdout
    log = spare["tmp"] / "logs" / "eval-posthoc.log"
    lines = log.read_text().splitlines()
    (argv_line,) = [line for line in lines if line.startswith("ARGV ")]
    assert json.loads(argv_line[len("ARGV "):]) == args  # every argument arrives intact
    assert lines[-1] == "[spare_node_eval.sh] exit status 3"  # the job's own exit status is logged
    tail = sh(spare, "tail", "1")
    assert tail.returncode == 0 and tail.stdout.strip() == "[spare_node_eval.sh] exit status 3"


def test_sync_adapter_and_data(spare):
    adapter = spare["tmp"] / "ckpt" / "global_step10_hf"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    proc = sh(spare, "sync-adapter", str(adapter), "adapters/s10")
    assert proc.returncode == 0, proc.stderr
    assert (spare["home"] / "adapters" / "s10" / "adapter_model.safetensors").read_bytes() == b"\0" * 16
    bad = sh(spare, "sync-adapter", str(spare["tmp"]))
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr
    data = spare["repo"] / "data"
    data.mkdir()
    (data / "probe.jsonl").write_text('{"input": "x", "label": "1"}\n')
    assert sh(spare, "sync-data").returncode == 0
    assert (spare["home"] / "Code" / "rft" / "data" / "probe.jsonl").is_file()


def test_settings_and_errors(spare):
    env = dict(spare["env"])
    env.pop("SPARE_HOST")
    proc = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "SPARE_HOST" in proc.stderr
    assert "Commands" in sh(spare, "--help").stdout
    dry = sh(spare, "start", "--", "--model", "m=/x", DRY_RUN="1", SESSION="ev 2")
    assert dry.returncode == 0 and dry.stdout.startswith("+ ssh -i ")
    assert not (spare["tmp"] / "logs").exists()  # a dry run touches nothing
    assert sh(spare, "frobnicate").returncode == 2
    assert "tail: N must be a number" in sh(spare, "tail", "x").stderr


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash is not installed")
def test_arguments_survive_a_dash_login_shell(spare):
    """A spare whose login shell is dash gets every byte: newline, quote, backslash, $'...'."""
    assert sh(spare, "sync-code", FAKE_LOGIN_SHELL="dash").returncode == 0
    args = ["--adapter", "a=/mnt/data/run\nx/step 10", "--note", "it's a\\b $'c' \t tab", "--empty", ""]
    proc = sh(spare, "start", "--", *args, FAKE_LOGIN_SHELL="dash")
    assert proc.returncode == 0, proc.stderr
    lines = (spare["tmp"] / "logs" / "eval-posthoc.log").read_text().splitlines()
    argv = [json.loads(line[len("ARGV "):]) for line in lines if line.startswith("ARGV ")]
    assert argv == [args]  # the newline did not split the path, nothing was reinterpreted
    adapter = spare["tmp"] / "ckpt"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    proc = sh(spare, "sync-adapter", str(adapter), "adapters/it's\nstep", FAKE_LOGIN_SHELL="dash")
    assert proc.returncode == 0, proc.stderr
    assert (spare["home"] / "adapters" / "it's\nstep" / "adapter_config.json").is_file()
