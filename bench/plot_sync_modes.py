#!/usr/bin/env python3
"""Engine-vs-trainer KL and served share per step, for runs of the two LoRA sync modes side by side.

Each argument is a run's metrics folder (the one holding its run manifest and step metrics,
``METRICS_LOG_DIR``). From the manifest it takes the sync mode (``RFT_LORA_SYNC``), the learning
rate and the base model; from the base model's safetensors the norm of the adapted q/k/v/o
weights ``|W0|``, so that each step's intended update can be read as ``|delta| / |W0|``
(``sync_target_norm / |W0|``). It prints one row per run, and writes a JSON of every step's
``gen_kl``, ``gen_kl_seq_max``, ``sync_served_share`` and ``|delta| / |W0|`` and a PNG with the
KL curves (log scale, the 0.002 and 0.02 limits of ``check_run.py``) and the served share.

    python bench/plot_sync_modes.py build/klcmp/*/rft_metrics/* --out bench/results/sync_modes_tiny
    bash bench/sync_modes_tiny.sh      # the runs themselves, then this
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rft.contract import ENV_LORA_SYNC, MANIFEST_ARGS, METRICS_FILE, RUN_MANIFEST  # noqa: E402
from rft.policy_drift import GEN_KL_STOP, GEN_KL_WARN  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="metrics folders of finished runs")
    parser.add_argument("--out", type=Path, required=True, help="path stem of the JSON and the PNG")
    return parser.parse_args(argv)


def adapted_weight_norm(model_dir: Path, targets: list[str]) -> float:
    """L2 norm over every ``<target>.weight`` of the base checkpoint (the W0 the adapter adds to)."""
    from safetensors import safe_open

    total = 0.0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if any(name.endswith(f"{t}.weight") for t in targets):
                    total += f.get_tensor(name).double().pow(2).sum().item()
    if total == 0.0:
        raise SystemExit(f"plot_sync_modes.py: {model_dir}: no {targets} weights in its safetensors")
    return math.sqrt(total)


def run_series(folder: Path) -> dict:
    """One run's mode, learning rate and per-step series."""
    manifest = json.loads((folder / RUN_MANIFEST).read_text())
    args = manifest[MANIFEST_ARGS]
    mode = manifest["env"].get(ENV_LORA_SYNC) or "native"
    w0 = adapted_weight_norm(Path(args["pretrain"]), list(args["target_modules"]))
    rows = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line.strip()]
    by_step = {r["global_step"]: r for r in rows if "gen_kl" in r}  # the last record of a step counts
    steps = sorted(by_step)
    series = {
        "step": steps,
        "gen_kl": [by_step[s]["gen_kl"] for s in steps],
        "gen_kl_seq_max": [by_step[s].get("gen_kl_seq_max") for s in steps],
        "sync_served_share": [by_step[s].get("sync_served_share") for s in steps],
        "delta_over_w0": [by_step[s]["sync_target_norm"] / w0 for s in steps],
        "reward": [by_step[s].get("reward_mean") for s in steps],
    }
    where = folder.resolve()
    shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where.name  # no machine paths in results
    return {"mode": mode, "lr": args["actor_learning_rate"], "w0_norm": w0, "run": str(shown),
            "gen_kl_mean": statistics.fmean(series["gen_kl"]), "gen_kl_max": max(series["gen_kl"]),
            "series": series}


def plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, share_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        label = f"{run['mode']}, LR {run['lr']:g}"
        style = "-" if run["mode"] == "native" else "--"
        s = run["series"]
        kl_ax.plot(s["step"], [max(v, 1e-12) for v in s["gen_kl"]], style, marker="o", ms=3, label=label)
        share_ax.plot(s["step"], s["sync_served_share"], style, marker="o", ms=3, label=label)
    kl_ax.axhline(GEN_KL_WARN, color="orange", lw=1, label=f"warn {GEN_KL_WARN}")
    kl_ax.axhline(GEN_KL_STOP, color="red", lw=1, label=f"stop advice {GEN_KL_STOP}")
    kl_ax.set(yscale="log", xlabel="rollout step", ylabel="gen_kl (k3, token mean)",
              title="engine vs trainer KL per step")
    share_ax.set(xlabel="rollout step", ylabel="served / intended update norm", ylim=(0, 1.1),
                 title="share of the LoRA update the engine serves")
    for ax in (kl_ax, share_ax):
        ax.grid(alpha=0.3)
    kl_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = sorted((run_series(folder) for folder in args.runs), key=lambda r: (r["lr"], r["mode"]))
    print(f"{'mode':8s} {'LR':>8s} {'steps':>5s} {'|d|/|W0| first..last':>22s} {'served first..last':>19s} "
          f"{'gen_kl mean':>12s} {'gen_kl max':>11s}")
    for run in runs:
        s = run["series"]
        print(f"{run['mode']:8s} {run['lr']:8.0e} {len(s['step']):5d} "
              f"{s['delta_over_w0'][0]:10.1e}..{s['delta_over_w0'][-1]:.1e} "
              f"{s['sync_served_share'][0]:9.3f}..{s['sync_served_share'][-1]:.3f} "
              f"{run['gen_kl_mean']:12.2e} {run['gen_kl_max']:11.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs, "limits": {"warn": GEN_KL_WARN, "stop": GEN_KL_STOP}}, indent=1))
    tmp.replace(json_path)
    plot(runs, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
