#!/usr/bin/env python3
"""Build rft's RL pool, SFT splits, probe sets and eval files from NuminaMath-1.5.

Reads the source once, filters it (question type, clean integer answer, no AMC/AIME,
validity flags, dedup by problem hash, quality, eval-set disjointness), splits it
deterministically for --seed, and writes every file atomically with a report:

    python prepare_sft_data.py                          # AI-MO/NuminaMath-1.5 from the hub
    python prepare_sft_data.py --source numina.parquet --ood-source math500.jsonl \\
        --aime-source aime2024.jsonl --out-dir data/
    python prepare_sft_data.py --check --out-dir data/  # files still match the report?

Files OpenRLHF reads with --input_key input --label_key label (rows {"input", "label"}).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rft import data_prep as dp


# Options that change how a run looks, not what it writes: kept out of the report.
RUN_ONLY_ARGS = ("no_progress", "check")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option says what it changes."""
    parser = argparse.ArgumentParser(
        prog="prepare_sft_data.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_argument_group("sources")
    src.add_argument(
        "--source",
        default=dp.DEFAULT_HUB_SOURCE,
        help="training source: a hub dataset id (loaded with datasets.load_dataset, split 'train'), "
        "or a local .parquet/.jsonl file or folder of them with NuminaMath-1.5 columns",
    )
    src.add_argument("--revision", default=None, help="hub revision (commit or tag) of --source, to pin it")
    src.add_argument(
        "--ood-source",
        default=dp.DEFAULT_OOD_SOURCE,
        help="MATH-style eval set for probe_set_200_ood.jsonl (hub id[:split] or local file; "
        "needs problem and answer columns); 'none' skips the file",
    )
    src.add_argument(
        "--aime-source",
        default=dp.DEFAULT_AIME_SOURCE,
        help="AIME 2024 problems for aime_eval.jsonl (hub id[:split] or local file); 'none' skips the file",
    )
    src.add_argument("--ood-revision", default=None, help="hub revision (commit or tag) of --ood-source, to pin it")
    src.add_argument("--aime-revision", default=None, help="hub revision (commit or tag) of --aime-source, to pin it")
    out = parser.add_argument_group("outputs")
    out.add_argument("--out-dir", type=Path, default=Path("data"), help="folder that receives every output")
    out.add_argument("--seed", type=int, default=42, help="decides which problem goes to which split")
    out.add_argument("--rl-pool-size", type=int, default=50_000, help="rows of sft_rl_pool.jsonl")
    out.add_argument("--sft-size", type=int, default=5_000, help="rows of sft_train.jsonl")
    out.add_argument("--dev-size", type=int, default=500, help="rows of sft_dev.jsonl")
    out.add_argument(
        "--pool-subset-size", type=int, default=400, help="rows of sft_rl_pool_400.jsonl, the head of the pool"
    )
    out.add_argument(
        "--probe-size", type=int, default=200, help="rows of probe_set_200.jsonl, pool problems after the subset"
    )
    out.add_argument("--ood-size", type=int, default=200, help="rows sampled into probe_set_200_ood.jsonl")
    flt = parser.add_argument_group("filters")
    flt.add_argument(
        "--min-problem-chars",
        type=int,
        default=20,
        help="problems shorter than this (after whitespace normalization) are dropped",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay one line a stage)")
    run.add_argument(
        "--check",
        action="store_true",
        help="only verify that the files in --out-dir match the sha256 in its prep_report.json",
    )
    return parser


def validate(args: argparse.Namespace) -> dp.SplitSizes:
    """Size arguments as SplitSizes, or PrepError naming the flag to fix."""
    for flag in ("rl_pool_size", "sft_size", "dev_size", "pool_subset_size", "probe_size", "ood_size"):
        if getattr(args, flag) < 0:
            raise dp.PrepError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.pool_subset_size + args.probe_size > args.rl_pool_size:
        raise dp.PrepError(
            "--pool-subset-size + --probe-size must not exceed --rl-pool-size (both are drawn from the pool)"
        )
    return dp.SplitSizes(args.rl_pool_size, args.sft_size, args.dev_size, args.pool_subset_size, args.probe_size)


def _is_none(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "none")


def _progress_bar(total: int | None, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="row", unit_scale=True, desc="filter", disable=disable, file=sys.stderr)


def _stage_table(stages: Sequence[dp.Stage], rows_read: int, read_seconds: float) -> list[str]:
    lines = [f"  {'stage':<20}{'remaining':>11}{'dropped':>10}{'seconds':>9}{'rows/s':>12}"]
    lines.append(f"  {'read':<20}{rows_read:>11,}{'':>10}{read_seconds:>9.2f}{_rate(rows_read, read_seconds):>12}")
    for st in stages:
        lines.append(
            f"  {st.name:<20}{st.remaining:>11,}{st.dropped:>10,}{st.seconds:>9.2f}{_rate(st.entered, st.seconds):>12}"
        )
    return lines


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"


def check_eval_sets_disjoint(eval_sets: Sequence[dp.EvalSet]) -> None:
    """PrepError when two eval files would hold the same problem (a result counted twice)."""
    files = {es.out_file: es.rows for es in eval_sets}
    overlap = dp.check_disjoint(files, [es.out_file for es in eval_sets])
    shared = {pair: n for pair, n in overlap.items() if n}
    if shared:
        pair, n = next(iter(shared.items()))
        sources = " and ".join(es.info.spec for es in eval_sets)
        raise dp.PrepError(
            f"{pair} would share {n} problem{'s' if n != 1 else ''} (by problem hash; from {sources}); "
            "remove them from --ood-source or --aime-source"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the report it wrote."""
    t_start = time.perf_counter()
    sizes = validate(args)
    timing: dict[str, Any] = {}
    # The training source first: a wrong path fails before any eval set is downloaded.
    info, batches = dp.open_source(
        args.source, dp.REQUIRED_COLUMNS, dp.MALFORMED, split="train", revision=args.revision
    )

    t0 = time.perf_counter()
    eval_sets: list[dp.EvalSet] = []
    for name, spec, out_file, datasource, size, revision in (
        ("ood", args.ood_source, dp.OUT_PROBE_OOD, "ood_probe", args.ood_size, args.ood_revision),
        ("aime", args.aime_source, dp.OUT_AIME, "aime", None, args.aime_revision),
    ):
        if _is_none(spec):
            dp.log(f"{name}: skipped (no source given); {out_file} is not written")
            continue
        eval_sets.append(dp.build_eval_set(name, spec, out_file, datasource, size, args.seed, revision))
        dp.log(f"{name}: {len(eval_sets[-1].rows)} problems from {spec}")
    check_eval_sets_disjoint(eval_sets)
    # Every problem of an eval source stays out of training, not only the sampled ones.
    eval_digests: dict[str, str] = {}
    for es in eval_sets:
        for digest in sorted(es.source_digests):
            eval_digests.setdefault(digest, es.name)
    timing["eval_sets_seconds"] = round(time.perf_counter() - t0, 3)

    bar = _progress_bar(info.rows, args.no_progress)
    state = {"last": 0}

    def advance(rows_read: int) -> None:
        bar.update(rows_read - state["last"])
        state["last"] = rows_read

    try:
        result = dp.filter_rows(batches, args.min_problem_chars, eval_digests, progress=advance)
    finally:
        bar.close()
    if result.rows_read == 0:
        raise dp.PrepError(f"{args.source}: holds no rows")

    t0 = time.perf_counter()
    sft_stage = dp.Stage("sft_selection")
    files = dp.make_splits(result.candidates, sizes, args.seed, sft_stage)
    for es in eval_sets:
        files[es.out_file] = es.rows
    overlap = dp.check_disjoint(
        files, (dp.OUT_POOL, dp.OUT_SFT_TRAIN, dp.OUT_SFT_DEV, dp.OUT_PROBE_OOD, dp.OUT_AIME)
    )
    if any(overlap.values()):
        raise RuntimeError(f"split overlap found, refusing to write: {overlap}")
    split_seconds = time.perf_counter() - t0

    stale = [name for name in dp.ALL_OUTPUTS if name not in files and (args.out_dir / name).exists()]
    for name in stale:
        dp.log(f"warning: {args.out_dir / name} is from an earlier run and was not checked against this pool")

    report: dict[str, Any] = {
        "schema": dp.REPORT_SCHEMA,
        "tool": "prepare_sft_data.py",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in sorted(vars(args).items())
            if k not in RUN_ONLY_ARGS
        },
        "source": info.to_report(),
        "rows_read": result.rows_read,
        "stages": [{"name": "start", "remaining": result.rows_read, "dropped": 0, "reasons": {}}]
        + [st.to_report() for st in result.stages],
        "eval_sets": {es.name: es.to_report() for es in eval_sets},
        "splits": {
            dp.OUT_POOL: {"requested": sizes.rl_pool},
            dp.OUT_POOL_SUBSET: {"requested": sizes.pool_subset, "of": dp.OUT_POOL},
            dp.OUT_PROBE_ID: {"requested": sizes.probe, "of": dp.OUT_POOL},
            dp.OUT_SFT_TRAIN: {"requested": sizes.sft_train},
            dp.OUT_SFT_DEV: {"requested": sizes.sft_dev},
        },
        # Problems after the pool, in split order, until SFT train + dev were full.
        "sft_selection": {"looked_at": sft_stage.entered, **sft_stage.to_report()},
        "overlap_by_problem_hash": overlap,
        "stale_files_not_written": stale,
    }

    t0 = time.perf_counter()
    timing.update(
        {
            "rows_read": result.rows_read,
            "read_seconds": round(result.read_seconds, 3),
            "stages": [
                {"name": st.name, "entered": st.entered, "seconds": round(st.seconds, 3)} for st in result.stages
            ],
            "split_seconds": round(split_seconds, 3),
        }
    )
    dp.publish(args.out_dir, files, report)
    timing["write_seconds"] = round(time.perf_counter() - t0, 3)
    timing["total_seconds"] = round(time.perf_counter() - t_start, 3)
    dp.write_json_atomic(args.out_dir / dp.OUT_TIMING, timing)

    dp.log(f"read {result.rows_read:,} rows from {args.source}")
    for line in _stage_table(result.stages, result.rows_read, result.read_seconds):
        dp.log(line)
    for name, meta in report["outputs"].items():
        dp.log(f"  wrote {args.out_dir / name}: {meta['rows']:,} rows, sha256 {meta['sha256'][:12]}")
    dp.log(f"report {args.out_dir / dp.OUT_REPORT}; {timing['total_seconds']:.1f} s in all")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            finished = dp.recover(args.out_dir) if args.out_dir.is_dir() else None
            if finished:
                dp.log(finished)
            problems = dp.verify_outputs(args.out_dir)
            for problem in problems:
                dp.log(problem)
            if not problems:
                dp.log(f"{args.out_dir}: every file matches {dp.OUT_REPORT}")
            return 1 if problems else 0
        run(args)
    except dp.PrepError as exc:
        print(f"prepare_sft_data.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
