#!/usr/bin/env python3
"""Check a GRPO run's health from its metrics directory and draw a dashboard.

    python check_run.py /mnt/scratch/rft_metrics_20b              # one report + run_health.png
    python check_run.py /mnt/scratch/rft_metrics_20b --follow     # re-check as the run goes on

Prints one verdict per check (ok / warn / stop / n/a) with the suggested action and writes
a PNG of the main curves with eval steps, checkpoints, the checkpoint to keep, reward failures
and NaN/inf steps marked. Two checks compare the engines with the trainer: the generation KL
(warn above 0.002, NeMo-RL's gpt-oss release gate; stop advice above 0.02 for 5 steps, where
NeMo-RL's merged bf16 sync sat) and the share of the intended update the engines serve. The spike log, the samples folder and --save_steps come from the
run's run_manifest.json when it is there.

Exit code: 0 healthy; 1 warnings (bad lines in the metrics files included); 2 stop (NaN or
inf, an early-stop signal or a failed smoke-test check); 3 unreadable input (no such folder,
a folder where the file should be, no permission, no step records yet, bad arguments).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from rft.run_health import (
    EXIT_UNREADABLE,
    METRICS_FILE,
    Thresholds,
    evaluate_run,
    exit_code,
    format_report,
    load_run,
    resolve_metrics,
    write_dashboard,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 3, not argparse's 2 (which means "stop" here)
        self.print_usage(sys.stderr)
        print(f"check_run.py: error: {message}", file=sys.stderr)
        sys.exit(EXIT_UNREADABLE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics_dir", type=Path, help="the run's METRICS_LOG_DIR (holds training_metrics.jsonl), or that file")
    p.add_argument("--png", type=Path, help="dashboard path (default: run_health.png beside the metrics file)")
    p.add_argument("--no-png", action="store_true", help="skip the dashboard")
    p.add_argument("--follow", action="store_true", help="re-check whenever the metrics file grows (Ctrl-C ends)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between checks with --follow (default 60)")
    p.add_argument("--max-norm", type=float, default=1.0, help="the run's --max_norm (grad clipping; default 1.0)")
    p.add_argument("--window", type=int, default=3, help="steps a condition must hold (default 3)")
    p.add_argument(
        "--save-steps",
        type=int,
        help="the run's --save_steps: the advice then names a checkpoint that exists (global_stepN); "
        "default: the value in the run's run_manifest.json",
    )
    return p.parse_args(argv)


def check_once(args: argparse.Namespace, last: list[int] | None = None) -> int:
    """One report (and PNG); returns the exit code, also stored in ``last[0]`` before printing."""
    last = last if last is not None else [EXIT_UNREADABLE]
    th = Thresholds(window=args.window, max_norm=args.max_norm, save_steps=args.save_steps)
    try:
        run = load_run(args.metrics_dir)
    except ValueError as e:
        last[0] = EXIT_UNREADABLE
        print(f"check_run.py: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if not run.records:
        last[0] = EXIT_UNREADABLE
        first = f" ({run.problems[0]}; {len(run.problems)} bad)" if run.problems else ""
        print(f"check_run.py: {run.paths.metrics_file}: no step records yet{first}", file=sys.stderr)
        return EXIT_UNREADABLE
    verdicts = evaluate_run(run, th)
    last[0] = exit_code(verdicts)  # an interrupt during the report still exits with it
    print(format_report(run, verdicts, str(args.metrics_dir)), flush=True)
    if not args.no_png:
        png = args.png or run.paths.metrics_dir / "run_health.png"
        try:
            write_dashboard(run, png, verdicts, th)
            print(f"dashboard: {png}", flush=True)
        except OSError as e:
            print(f"check_run.py: cannot write {png}: {e}; pass --png to a writable path", file=sys.stderr)
    return exit_code(verdicts)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.follow:
        return check_once(args)
    try:
        _, path = resolve_metrics(args.metrics_dir)
    except ValueError:  # not there yet: wait for the launcher to create it
        path = args.metrics_dir / METRICS_FILE
    seen, last = None, [EXIT_UNREADABLE]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            stamp = (path.stat().st_size, path.stat().st_mtime) if path.exists() else None
            if stamp != seen:
                seen = stamp
                print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
                check_once(args, last)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return last[0]


if __name__ == "__main__":
    sys.exit(main())
