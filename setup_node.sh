#!/usr/bin/env bash
# Installs rft's pinned training stack (requirements-node.txt) on a GPU node.
#
#   bash setup_node.sh                  # into the active Python environment
#   VENV=/opt/rft-venv bash setup_node.sh   # create/reuse a virtual environment there
#   bash setup_node.sh --help           # this text; installs nothing
#
# Settings: VENV (unset: the active environment), PYTHON (python3.11), REQS
# (requirements-node.txt), FLASH_ATTN_SPEC (flash-attn==2.8.3), MAX_JOBS (16).
#
# Order matters: torch first (vLLM 0.15.1 pins it), then flash-attn, which openrlhf
# requires and which compiles against the installed torch (no build isolation),
# then everything else, openrlhf's own dependencies included, then rft itself (editable),
# so that `import rft` in this Python is this checkout.
# Exit status: 0 installed; 2 bad argument or setting (one line); pip's status when an install fails.
set -euo pipefail

case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *)
    echo "setup_node.sh: unknown argument $1; settings are environment variables (see --help)" >&2
    exit 2
    ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-}"
PYTHON="${PYTHON:-python3.11}"
REQS="${REQS:-$ROOT/requirements-node.txt}"
FLASH_ATTN_SPEC="${FLASH_ATTN_SPEC:-flash-attn==2.8.3}"
MAX_JOBS="${MAX_JOBS:-16}"  # parallel compile jobs for flash-attn; lower it on small hosts

if [[ ! -f "$REQS" ]]; then
  echo "setup_node.sh: $REQS not found; run from a clone of rft or set REQS=" >&2
  exit 2
fi
if [[ -n "$VENV" ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  PYTHON="$VENV/bin/python"
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup_node.sh: $PYTHON is not Python 3.11 (openrlhf 0.9.3 ships a cp311 wheel only); set PYTHON=" >&2
  exit 2
fi

pip=("$PYTHON" -m pip install --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel packaging ninja
"${pip[@]}" "$(grep -E '^torch==' "$REQS")"
MAX_JOBS="$MAX_JOBS" "${pip[@]}" --no-build-isolation "$FLASH_ATTN_SPEC"
"${pip[@]}" -r "$REQS"
# rft itself, editable: the patched OpenRLHF imports its hooks (rft.openrlhf) from this checkout.
"${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$PYTHON" - <<'PY'
from importlib.metadata import version
for name in ("rft", "openrlhf", "vllm", "torch", "deepspeed", "transformers", "ray", "peft", "flash-attn"):
    print(f"{name:14s} {version(name)}")
PY
echo "setup_node.sh: stack installed; next: bash apply_patches.sh"
