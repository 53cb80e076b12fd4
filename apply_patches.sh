#!/usr/bin/env bash
# Applies rft's patches (patches/series) to the installed OpenRLHF 0.9.3, all or nothing.
#
#   bash apply_patches.sh              # apply; a second run changes nothing and exits 0
#   bash apply_patches.sh --status     # one line per patch (applied / not applied / partial / conflicts),
#                                      # then whether `import rft` in PYTHON finds this checkout
#   bash apply_patches.sh --check      # what would apply, is applied, conflicts; changes nothing
#   bash apply_patches.sh --revert     # back to the pristine files, verified by patches/MANIFEST.sha256
#   bash apply_patches.sh --help       # every option, exit codes, and how to make a patch
#
# Exit codes (docs/patches.md): 0 done; 1 a patch conflicts; 2 bad arguments or input files;
# 3 wrong environment; 4 a write failed (restored); 5 --status: not every patch applied;
# 6 --status: import rft in PYTHON does not find this checkout; 130/129/143 Ctrl-C/SIGHUP/SIGTERM.
# A killed run (even SIGKILL) leaves every file whole: run the same command again to finish.
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

# By its path, with PYTHONPATH as the caller set it: --status reports what `import rft` finds in
# the training interpreter, which a PYTHONPATH added here would hide. The script takes its own
# folder (rft/) off sys.path first, where rft/openrlhf (the patches' hooks) would shadow openrlhf.
exec "$PYTHON" "$ROOT/rft/patching.py" "$@"
