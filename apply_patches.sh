#!/usr/bin/env bash
# Applies rft's patches (patches/series) to the installed OpenRLHF 0.9.3, all or nothing.
#
#   bash apply_patches.sh              # apply; a second run changes nothing and exits 0
#   bash apply_patches.sh --status     # one line per patch: applied / not applied / conflicts
#   bash apply_patches.sh --check      # what would apply, is applied, conflicts; changes nothing
#   bash apply_patches.sh --revert     # back to the pristine files, verified by patches/MANIFEST.sha256
#   bash apply_patches.sh --help       # every option, exit codes, and how to make a patch
#
# Settings:
#   PYTHON   the Python whose openrlhf is patched (default: python, else python3, on PATH,
#            i.e. the active environment); --target DIR patches DIR/openrlhf instead.
# The work is done by rft/patching.py, run with that Python (standard library only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"

if [[ -z "$PYTHON" ]] || ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "apply_patches.sh: no Python found (PYTHON='${PYTHON}'); activate the training environment or set PYTHON=/path/to/python" >&2
  exit 3
fi

# As a module of the checkout, not a script: a script's own folder (rft/) goes first on sys.path,
# where the rft.openrlhf package would shadow the real openrlhf.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m rft.patching "$@"
