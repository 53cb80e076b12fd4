"""Per-layer figures of the patched actor under ZeRO-3, from ``bench_actor_mxfp4.py`` runs at two layer counts.

``bench/actor_zero3_ladder.sh`` runs ``bench_actor_mxfp4.py`` once per ``RFT_FAST_GPTOSS``
setting and layer count and writes one JSON a run into a folder; this reads them all, and for
each setting takes the difference between its two layer counts (so the embedding, the output
head, the loss and the optimizer step cancel): train and log-prob milliseconds per layer, the
step's GPU peak at the larger count, tokens per second through one layer, and the fraction of
the H100's dense bf16 peak that the layer's matrix work (``work_per_layer.train_tflop`` of the
model's ``actor_breakdown_<model>.json``) reaches, and the larger count's per-component pass
(``--components``, ``bench/component_timer.py``) where the run has one. It prints the tables and
writes the figures into that JSON under ``patched_actor_zero3``.

    python bench/summarize_actor_zero3.py build/actor-zero3 --model gpt-oss-20b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BF16_DENSE_TFLOPS = 989.0
"""The H100 SXM's dense bf16 tensor-core peak (NVIDIA's datasheet), the denominator of the fraction."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of bench_actor_mxfp4.py JSON files")
    parser.add_argument("--model", required=True, choices=["gpt-oss-20b", "gpt-oss-120b"])
    parser.add_argument("--breakdown", type=Path,
                        help="JSON to update (default bench/results/actor_breakdown_<model>.json)")
    return parser.parse_args(argv)


def per_layer(small: dict, big: dict, train_tflop: float) -> dict:
    """The figures of one setting from its runs at two layer counts.

    >>> a = {"layers": 2, "seq": 100, "steady_step_time_s": 0.10, "steady_logprob_time_s": 0.04,
    ...      "step_peak_gpu_gib": [10.0]}
    >>> b = {**a, "layers": 4, "steady_step_time_s": 0.18, "steady_logprob_time_s": 0.06, "step_peak_gpu_gib": [12.0]}
    >>> f = per_layer(a, b, train_tflop=0.4)
    >>> round(f["train_ms_per_layer"], 3), round(f["logprob_ms_per_layer"], 3), f["peak_gib"]
    (40.0, 10.0, 12.0)
    >>> f["train_tokens_per_s_per_layer"], round(f["train_fraction_of_bf16_peak"], 4)
    (2500, 0.0101)
    """
    layers = big["layers"] - small["layers"]
    if layers <= 0:
        raise ValueError(f"need two layer counts, got {small['layers']} and {big['layers']}")
    train_s = (big["steady_step_time_s"] - small["steady_step_time_s"]) / layers
    logprob_s = (big["steady_logprob_time_s"] - small["steady_logprob_time_s"]) / layers
    return {
        "layers": [small["layers"], big["layers"]],
        "train_ms_per_layer": train_s * 1e3,
        "logprob_ms_per_layer": logprob_s * 1e3,
        "peak_gib": max(big["step_peak_gpu_gib"]),
        "train_tokens_per_s_per_layer": round(big["seq"] / train_s),
        "train_fraction_of_bf16_peak": train_tflop / train_s / BF16_DENSE_TFLOPS,
        "components": big.get("components"),  # bench/component_timer.py's pass at the larger count, if run
    }


def setting_of(run: dict) -> str:
    """The ``RFT_FAST_GPTOSS`` value a run used (``0`` for none)."""
    return str(run.get("fast_gptoss") or "0")


def summarize(runs: Iterable[dict], model: str, train_tflop: float) -> dict[str, dict]:
    """Per setting of ``model``: :func:`per_layer` of its smallest and largest layer count."""
    by_setting: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("model") == model:
            by_setting.setdefault(setting_of(run), []).append(run)
    out = {}
    for setting, group in sorted(by_setting.items()):
        group.sort(key=lambda r: r["layers"])
        if len(group) >= 2:
            out[setting] = per_layer(group[0], group[-1], train_tflop)
    return out


def write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    breakdown_path = args.breakdown or REPO / "bench" / "results" / f"actor_breakdown_{args.model}.json"
    try:
        breakdown = json.loads(breakdown_path.read_text())
        train_tflop = breakdown["work_per_layer"]["train_tflop"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"summarize_actor_zero3.py: {breakdown_path}: no work_per_layer.train_tflop ({exc}); "
              f"run bench/bench_actor_breakdown.py --model {args.model} first", file=sys.stderr)
        return 2
    runs = [run for run in (json.loads(p.read_text()) for p in sorted(args.runs.glob("*.json")))
            if "steady_step_time_s" in run]  # bench_actor_mxfp4.py's runs, nothing else of the folder
    figures = summarize(runs, args.model, train_tflop)
    if not figures:
        print(f"summarize_actor_zero3.py: {args.runs}: no setting of {args.model} with two layer counts; "
              f"run bench/actor_zero3_ladder.sh", file=sys.stderr)
        return 2
    gpus = sorted({r.get("gpu", "?") for r in runs if r.get("model") == args.model})
    print(f"{args.model}, patched actor under ZeRO-3 (world size 1), {', '.join(gpus)}")
    print(f"  {'RFT_FAST_GPTOSS':<24} {'train ms':>9} {'log-prob ms':>12} {'peak GiB':>9} {'tokens/s':>9} {'of bf16 peak':>13}")
    for setting, f in figures.items():
        print(f"  {setting:<24} {f['train_ms_per_layer']:>9.1f} {f['logprob_ms_per_layer']:>12.1f} "
              f"{f['peak_gib']:>9.2f} {f['train_tokens_per_s_per_layer']:>9,} {f['train_fraction_of_bf16_peak']:>13.1%}")
    sys.path.insert(0, str(REPO / "bench"))
    from component_timer import format_report

    for setting, f in figures.items():
        if f["components"] and "train" in f["components"]:
            print(f"\nRFT_FAST_GPTOSS={setting}, {f['layers'][1]} layers:")
            print(format_report(f["components"]["train"], "  training step"))
            print(format_report(f["components"]["logprob"], "  log-prob forward"))
    breakdown["patched_actor_zero3"] = {
        "gpu": ", ".join(gpus), "seq": breakdown.get("seq"), "per_setting": figures,
        "note": "bench/summarize_actor_zero3.py over bench/actor_zero3_ladder.sh runs; per layer from two layer "
                "counts; fraction = work_per_layer.train_tflop / time / 989 TFLOP/s",
    }
    write_json(breakdown_path, breakdown)
    print(f"wrote {breakdown_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
