#!/usr/bin/env bash
# Run eval_posthoc.py on a spare node while training keeps the primary busy.
#
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh sync-code
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh sync-data
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh sync-adapter /mnt/data/rft_checkpoints/run/global_step130_hf
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh start -- --adapter s130=/mnt/data/... --base openai/gpt-oss-20b ...
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh tail 50
#   SPARE_HOST=user@spare scripts/spare_node_eval.sh status | attach | stop
#
# Commands
#   sync-code             send the committed HEAD as a git bundle and fast-forward the spare's
#                         checkout to it (cloned there the first time); prints both SHAs
#   sync-data [DIR]       rsync the data directory (default: the repository's data/, gitignored)
#   sync-adapter DIR [REMOTE_DIR]
#                         rsync a LoRA adapter directory (default: the same path on the spare)
#   start [--] ARGS...    start "eval_posthoc.py ARGS" in a detached tmux session, logging to $LOG
#   tail [N]              last N lines of the log (default 40)
#   attach                attach to the tmux session (Ctrl-B D detaches)
#   status                tmux sessions and GPU use on the spare
#   stop                  end the tmux session
#
# Settings (environment; nothing about any host is stored in the repository)
#   SPARE_HOST       required: [user@]host of the spare node
#   SSH_KEY          identity file for ssh/scp/rsync (default: ssh's own choice)
#   SSH_OPTS         extra ssh options, whitespace-separated (e.g. "-o ConnectTimeout=10")
#   REMOTE_REPO      checkout on the spare, relative to its home or absolute (default Code/rft)
#   REMOTE_PYTHON    command that runs Python on the spare (default: conda run -n $CONDA_ENV python)
#   CONDA_ENV        conda environment of the default REMOTE_PYTHON (default rft)
#   SESSION          tmux session name (default eval-posthoc)
#   LOG_DIR          log directory on the spare (default /mnt/scratch/eval_spare/logs)
#   LOG              log file on the spare (default $LOG_DIR/$SESSION.log)
#   REMOTE_TMP       where the code bundle is copied on the spare (default /tmp)
#   DRY_RUN=1        print the ssh/scp/rsync commands instead of running them
set -euo pipefail

SSH_KEY="${SSH_KEY:-}"
SSH_OPTS="${SSH_OPTS:-}"
REMOTE_REPO="${REMOTE_REPO:-Code/rft}"
CONDA_ENV="${CONDA_ENV:-rft}"
REMOTE_PYTHON="${REMOTE_PYTHON:-conda run --no-capture-output -n ${CONDA_ENV} python}"
SESSION="${SESSION:-eval-posthoc}"
LOG_DIR="${LOG_DIR:-/mnt/scratch/eval_spare/logs}"
LOG="${LOG:-${LOG_DIR}/${SESSION}.log}"
REMOTE_TMP="${REMOTE_TMP:-/tmp}"
DRY_RUN="${DRY_RUN:-0}"

PROG="$(basename "$0")"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "${PROG}: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Quote each argument for a POSIX shell on the other side: the spare's login shell may be
# dash, which reads bash's printf %q forms ($'a\nb' for a newline) as other words. Single
# quotes keep every byte but the quote itself, written '\'' (close, escaped quote, reopen);
# a word of only safe characters stays bare, so dry runs read easily.
quote() {
  local out="" arg q="'\\''"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/"$q"}' "
    fi
  done
  printf '%s' "${out% }"
}

# Quote for rsync's -e, which splits its command itself: quotes group words, a quote inside
# single quotes is doubled, and backslashes are not special (rsync(1), --rsh).
rsync_quote() {
  local out="" arg
  for arg in "$@"; do
    out+="'${arg//\'/\'\'}' "
  done
  printf '%s' "${out% }"
}

SSH_ARGS=()
if [[ -n "$SSH_KEY" ]]; then
  SSH_ARGS+=(-i "$SSH_KEY")
fi
if [[ -n "$SSH_OPTS" ]]; then
  read -r -a extra <<<"$SSH_OPTS"
  SSH_ARGS+=("${extra[@]}")
fi

run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# Run one shell command line on the spare (its login shell, starting in its home).
remote() {
  run ssh "${SSH_ARGS[@]}" "$SPARE_HOST" "$1"
}

rsync_to() {
  local ssh_cmd
  ssh_cmd="ssh $(rsync_quote "${SSH_ARGS[@]}")"
  run rsync -az --partial -e "${ssh_cmd% }" "$1" "${SPARE_HOST}:$2"
}

SYNC_TMP=""
cleanup() {
  if [[ -n "$SYNC_TMP" ]]; then
    rm -rf "$SYNC_TMP"
  fi
}
trap cleanup EXIT

cmd_sync_code() {
  local head dirty bundle remote_bundle repo_q bundle_q
  head="$(git -C "$REPO" rev-parse HEAD)"
  dirty="$(git -C "$REPO" status --porcelain --untracked-files=no)"
  if [[ -n "$dirty" ]]; then
    echo "${PROG}: note: uncommitted changes are not sent; the spare gets HEAD ${head}" >&2
  fi
  SYNC_TMP="$(mktemp -d)"
  bundle="${SYNC_TMP}/rft-sync.bundle"
  git -C "$REPO" bundle create "$bundle" HEAD 2>/dev/null
  remote_bundle="${REMOTE_TMP}/rft-sync-${head:0:12}.bundle"
  run scp "${SSH_ARGS[@]}" "$bundle" "${SPARE_HOST}:${remote_bundle}"
  repo_q="$(quote "$REMOTE_REPO")"
  bundle_q="$(quote "$remote_bundle")"
  # First time: clone from the bundle. Later: fetch into a private ref and fast-forward
  # (a diverged checkout on the spare is an error, never overwritten).
  remote "set -e
if [ -d ${repo_q}/.git ]; then
  git -C ${repo_q} fetch -q ${bundle_q} +HEAD:refs/rft-sync/head
  git -C ${repo_q} merge -q --ff-only refs/rft-sync/head
else
  git clone -q ${bundle_q} ${repo_q}
fi
rm -f ${bundle_q}
echo \"spare HEAD: \$(git -C ${repo_q} rev-parse HEAD)\""
  echo "local HEAD: ${head}"
}

cmd_sync_data() {
  local dir="${1:-${REPO}/data}"
  [[ -d "$dir" ]] || die "sync-data: ${dir} is not a directory; pass the data directory to send"
  rsync_to "${dir%/}/" "${REMOTE_REPO}/data/"
}

cmd_sync_adapter() {
  local src="${1:-}" dst
  [[ -n "$src" ]] || die "sync-adapter: pass the adapter directory (the one holding adapter_config.json)"
  [[ -f "${src%/}/adapter_config.json" ]] || die "sync-adapter: ${src} has no adapter_config.json; pass a LoRA adapter directory"
  dst="${2:-$(cd "$src" && pwd)}"
  remote "mkdir -p $(quote "$dst")"
  rsync_to "${src%/}/" "${dst%/}/"
}

cmd_start() {
  if [[ "${1:-}" == "--" ]]; then
    shift
  fi
  [[ $# -gt 0 ]] || die "start: pass the eval_posthoc.py arguments (after --)"
  local inner wrapped
  # The job: run the evaluation, append everything to the log, end with the exit status.
  inner="cd $(quote "$REMOTE_REPO") && { ${REMOTE_PYTHON} eval_posthoc.py $(quote "$@"); echo \"[${PROG}] exit status \$?\"; } 2>&1 | tee -a $(quote "$LOG")"
  wrapped="bash -lc $(quote "$inner")"
  remote "mkdir -p $(quote "$LOG_DIR") && tmux new-session -d -s $(quote "$SESSION") $(quote "$wrapped")"
  echo "started tmux session ${SESSION} on ${SPARE_HOST}; log: ${LOG} (${PROG} tail)"
}

cmd_tail() {
  local n="${1:-40}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "tail: N must be a number of lines, got ${n}"
  remote "tail -n ${n} $(quote "$LOG")"
}

cmd_attach() {
  run ssh -t "${SSH_ARGS[@]}" "$SPARE_HOST" "tmux attach -t $(quote "$SESSION")"
}

cmd_status() {
  remote "tmux list-sessions 2>/dev/null || echo 'no tmux sessions'; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv 2>/dev/null || true"
}

cmd_stop() {
  remote "tmux kill-session -t $(quote "$SESSION")"
}

main() {
  local cmd="${1:-}"
  if [[ -z "$cmd" || "$cmd" == "-h" || "$cmd" == "--help" || "$cmd" == "help" ]]; then
    usage
    return 0
  fi
  shift
  : "${SPARE_HOST:?set SPARE_HOST=[user@]host of the spare node}"
  case "$cmd" in
    sync-code) cmd_sync_code "$@" ;;
    sync-data) cmd_sync_data "$@" ;;
    sync-adapter) cmd_sync_adapter "$@" ;;
    start) cmd_start "$@" ;;
    tail) cmd_tail "$@" ;;
    attach) cmd_attach "$@" ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    *) die "unknown command ${cmd}; see ${PROG} --help" ;;
  esac
}

main "$@"
