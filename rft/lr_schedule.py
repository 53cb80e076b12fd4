"""Pre-flight check of the learning-rate schedule an OpenRLHF 0.9.3 GRPO run will follow.

OpenRLHF 0.9.3 builds the actor's scheduler once, before training, from a step
count it computes from the prompt pool (``trainer/ppo_trainer.py:57-59``)::

    max_steps = len(prompts) * n_samples_per_prompt // train_batch_size * num_episodes * max_epochs

and hands it to transformers (``trainer/ray/ppo_actor.py:452-458``)::

    get_scheduler("cosine_with_min_lr", optim,
                  num_warmup_steps=math.ceil(max_steps * lr_warmup_ratio),
                  num_training_steps=max_steps,
                  scheduler_specific_kwargs={"min_lr": actor_learning_rate * 0.1})

A run whose pool is small, or whose warmup is long, can spend its whole budget
at a fraction of the intended learning rate and look "flat". This module
reproduces both computations with the standard library only (no torch), prints
the LR at the steps that matter, and refuses a schedule that cannot work.

Step numbering: "the LR at step s" is the learning rate the optimizer applies in
its s-th update (s = 1 is the first). DeepSpeed steps the scheduler after each
optimizer update, so update s uses ``base_lr * lambda(s - 1)``: step 1 of a run
with warmup always trains at LR 0. (OpenRLHF's logged ``actor_lr`` after update
s is the LR of update s + 1.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

# Steps whose LR the report lists, besides the end of warmup and the last step.
REPORT_STEPS = (1, 5, 10, 20, 50)
# The abort rule: the LR applied at CHECK_STEP must reach MIN_FRACTION of the target,
# and the run must have at least MIN_STEPS optimizer steps.
CHECK_STEP = 20
MIN_FRACTION = 0.3
MIN_STEPS = 20
# OpenRLHF 0.9.3 passes min_lr = 0.1 * actor_learning_rate (ppo_actor.py:457).
MIN_LR_FACTOR = 0.1
SPARK_CHARS = "▁▂▃▄▅▆▇█"
# OpenRLHF 0.9.3's --max_samples default (cli/train_ppo_ray.py:342).
DEFAULT_MAX_SAMPLES = 100_000_000


@dataclass(frozen=True)
class RunShape:
    """The settings that decide the schedule (names follow OpenRLHF's flags)."""

    pool: int  # prompts in --prompt_data
    n_samples_per_prompt: int
    train_batch_size: int  # samples per optimizer step
    num_episodes: int
    lr_warmup_ratio: float
    actor_learning_rate: float
    rollout_batch_size: int  # prompts per rollout
    max_epochs: int = 1
    max_samples: int = DEFAULT_MAX_SAMPLES


def num_prompts(shape: RunShape) -> int:
    """Prompts OpenRLHF keeps: ``select(range(min(max_samples, len(data))))`` (ppo_trainer.py:39)."""
    return int(min(shape.max_samples, shape.pool))


def total_steps(shape: RunShape) -> int:
    """``max_steps`` exactly as OpenRLHF 0.9.3 computes it (ppo_trainer.py:57-59), left to right."""
    return (
        num_prompts(shape)
        * shape.n_samples_per_prompt
        // shape.train_batch_size
        * shape.num_episodes
        * shape.max_epochs
    )


def warmup_steps(shape: RunShape) -> int:
    """``math.ceil(max_steps * lr_warmup_ratio)`` (ppo_actor.py:455)."""
    return math.ceil(total_steps(shape) * shape.lr_warmup_ratio)


def rollouts_per_episode(shape: RunShape) -> int:
    """Full rollout batches per pass over the pool.

    The sample generator stops when the dataloader runs dry before a rollout batch is
    full and discards the partial batch (``_collect_prompt_batch`` and ``_generate_vllm``,
    experience_maker.py:212-227, 310-313).
    """
    return num_prompts(shape) // shape.rollout_batch_size


def run_optimizer_steps(shape: RunShape) -> int:
    """Optimizer updates the run will take (no dynamic filtering).

    Every full rollout yields ``rollout_batch_size * n_samples_per_prompt`` samples,
    trained ``max_epochs`` times; DeepSpeed updates once per ``train_batch_size``
    samples, carrying a remainder over to the next rollout. This equals
    :func:`total_steps` when ``rollout_batch_size`` divides the pool; otherwise the
    scheduler's horizon is longer than the run and the cosine never reaches min_lr.
    """
    samples = (
        rollouts_per_episode(shape)
        * shape.rollout_batch_size
        * shape.n_samples_per_prompt
        * shape.max_epochs
        * shape.num_episodes
    )
    return samples // shape.train_batch_size


def min_lr_rate(lr: float) -> float:
    """The ratio transformers derives from ``min_lr``: ``min_lr / optimizer.defaults["lr"]``."""
    return (lr * MIN_LR_FACTOR) / lr


def lr_lambda(current_step: int, num_warmup_steps: int, num_training_steps: int, rate: float) -> float:
    """transformers 4.57.6 ``_get_cosine_schedule_with_warmup_lr_lambda`` with num_cycles=0.5.

    Transcribed operation for operation (optimization.py) so that the float result is
    bit-identical: linear warmup from 0, then a half cosine from 1 down to ``rate``.
    """
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress))
    factor = factor * (1 - rate) + rate
    return max(0, factor)


def lr_at(shape: RunShape, step: int) -> float:
    """LR the optimizer applies in update ``step`` (1-based): ``base_lr * lambda(step - 1)``."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    lam = lr_lambda(step - 1, warmup_steps(shape), total_steps(shape), min_lr_rate(shape.actor_learning_rate))
    return shape.actor_learning_rate * lam


def abort_reasons(shape: RunShape, lr_at_check: float | None) -> list[str]:
    """Why a schedule is refused (empty list: it passes).

    ``lr_at_check`` is the LR at :data:`CHECK_STEP` (None when the run is shorter).
    The rule fires strictly below the thresholds: exactly 30 % of the target, or
    exactly 20 steps, passes.
    """
    reasons = []
    steps = min(total_steps(shape), run_optimizer_steps(shape))
    if steps < MIN_STEPS:
        reasons.append(
            f"the run has {steps} optimizer steps, fewer than {MIN_STEPS}: "
            "use more prompts or more episodes (or a smaller train_batch_size)"
        )
    if lr_at_check is not None and lr_at_check < MIN_FRACTION * shape.actor_learning_rate:
        pct = 100.0 * lr_at_check / shape.actor_learning_rate
        reasons.append(
            f"LR at step {CHECK_STEP} is {lr_at_check:.3g} = {pct:.1f}% of the target {shape.actor_learning_rate:g}, "
            f"below {MIN_FRACTION:.0%}: raise LR, lower WARMUP, or use more prompts"
        )
    return reasons


@dataclass
class Report:
    """Everything the pre-flight prints."""

    inputs: dict
    total_steps: int
    warmup_steps: int
    rollouts_per_episode: int
    run_optimizer_steps: int
    target_lr: float
    min_lr: float
    lr_by_step: dict[str, float]
    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def report_steps(shape: RunShape) -> list[int]:
    """The listed steps that exist in this run, plus the end of warmup and the last step."""
    total = total_steps(shape)
    steps = {s for s in REPORT_STEPS if s <= total}
    if total >= 1:
        steps.add(total)
        steps.add(max(1, min(warmup_steps(shape), total)))
    return sorted(steps)


def build_report(shape: RunShape) -> Report:
    """Compute the schedule figures and the verdict for ``shape``."""
    total = total_steps(shape)
    lr_by_step = {str(s): lr_at(shape, s) for s in report_steps(shape)}
    check = lr_at(shape, CHECK_STEP) if total >= CHECK_STEP else None
    reasons = abort_reasons(shape, check)
    notes = []
    run_steps = run_optimizer_steps(shape)
    if run_steps != total:
        notes.append(
            f"the scheduler plans {total} steps but the run takes {run_steps} "
            f"({num_prompts(shape)} prompts do not fill {rollouts_per_episode(shape) + 1} rollouts of "
            f"{shape.rollout_batch_size}); the LR never decays to min_lr"
        )
    return Report(
        inputs=asdict(shape),
        total_steps=total,
        warmup_steps=warmup_steps(shape),
        rollouts_per_episode=rollouts_per_episode(shape),
        run_optimizer_steps=run_steps,
        target_lr=shape.actor_learning_rate,
        min_lr=shape.actor_learning_rate * MIN_LR_FACTOR,
        lr_by_step=lr_by_step,
        verdict="abort" if reasons else "ok",
        reasons=reasons,
        notes=notes,
    )


def sparkline(shape: RunShape, width: int = 60) -> str:
    """The LR over the whole run as one line of block characters (0 to the target)."""
    total = total_steps(shape)
    if total < 1:
        return ""
    cols = min(width, total)
    chars = []
    for c in range(cols):
        step = 1 + (c * (total - 1)) // max(1, cols - 1) if cols > 1 else 1
        frac = lr_at(shape, step) / shape.actor_learning_rate
        chars.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(frac * len(SPARK_CHARS)))])
    return "".join(chars)


def format_report(report: Report, shape: RunShape) -> str:
    """The human-readable table."""
    warm = report.warmup_steps
    kept = num_prompts(shape)
    capped = f" (first {kept} of {shape.pool}, --max_samples)" if kept < shape.pool else ""
    lines = [
        f"pool {kept} prompts{capped} x {shape.n_samples_per_prompt} samples // "
        f"train_batch_size {shape.train_batch_size} x {shape.num_episodes} episodes x {shape.max_epochs} epochs "
        f"= {report.total_steps} optimizer steps (warmup {warm})",
        f"rollouts: {report.rollouts_per_episode} per episode of {shape.rollout_batch_size} prompts; "
        f"the run takes {report.run_optimizer_steps} optimizer steps",
        f"target LR {report.target_lr:g}, min LR {report.min_lr:g} (cosine_with_min_lr)",
        "",
        f"{'step':>8}  {'LR':>10}  {'% target':>8}",
    ]
    for key, lr in report.lr_by_step.items():
        step = int(key)
        tags = []
        if step == min(warm, report.total_steps) or (warm == 0 and step == 1):
            tags.append("end of warmup")
        if step == report.total_steps:
            tags.append("last step")
        tag = f"  <- {', '.join(tags)}" if tags else ""
        lines.append(f"{step:>8}  {lr:>10.3e}  {100.0 * lr / report.target_lr:>7.1f}%{tag}")
    spark = sparkline(shape)
    if spark:
        lines += ["", f"LR 1..{report.total_steps}: {spark}"]
    lines += [f"note: {n}" for n in report.notes]
    lines.append("")
    if report.reasons:
        lines += [f"ABORT: {r}" for r in report.reasons]
    else:
        lines.append(f"OK: LR at step {CHECK_STEP} is at least {MIN_FRACTION:.0%} of the target")
    return "\n".join(lines)


def plot_schedule(shape: RunShape, path: str) -> None:
    """Write the LR of every update as a PNG (matplotlib, imported only here); atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = total_steps(shape)
    stride = max(1, total // 4000)
    steps = list(range(1, total + 1, stride))
    if steps and steps[-1] != total:
        steps.append(total)
    lrs = [lr_at(shape, s) for s in steps]
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=120)
    ax.plot(steps, lrs, lw=1.5)
    target = shape.actor_learning_rate
    ax.axhline(MIN_FRACTION * target, color="tab:red", ls=":", lw=1, label=f"{MIN_FRACTION:.0%} of target")
    if total >= CHECK_STEP:
        ax.axvline(CHECK_STEP, color="tab:red", ls="--", lw=1, label=f"update {CHECK_STEP}")
    ax.axvline(max(1, warmup_steps(shape)), color="tab:gray", ls="--", lw=1, label="end of warmup")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{total} updates, warmup {warmup_steps(shape)}, LR {target:g} -> min {target * MIN_LR_FACTOR:g}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lr_schedule.", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class FromEnv:
    """A default read from an environment variable, converted after parsing.

    argparse would convert a string default itself and blame the option (``--lr``) for a
    bad ``LR=abc``; this keeps the variable's name for the message.
    """

    name: str
    text: str


def _env(name: str, default: str | None) -> str | FromEnv | None:
    value = os.environ.get(name)
    return FromEnv(name, value) if value not in (None, "") else default


class _OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit status 2, not the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def count_rows(path: str) -> int:
    """Rows of a JSONL file as the datasets loader sees them (non-blank lines)."""
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; each defaults to its environment variable, then to the 20b launcher's value."""
    p = _OneLineParser(
        prog="preflight_lr.sh",
        description=(
            "Check the LR schedule OpenRLHF 0.9.3 will build (linear warmup + cosine_with_min_lr, "
            "min_lr = 0.1 x LR) before launching. Exits 1 when the LR at step 20 is below 30% of the "
            "target or the run has fewer than 20 optimizer steps; 2 on bad input (one line naming "
            "the variable or option), an unwritable --plot included."
        ),
        epilog=(
            "Environment: POOL NS TBS EP WARMUP LR RBS MAX_EPOCHS MAX_SAMPLES (same meaning as the options; "
            "an option wins over its variable). "
            "Example: EP=40 LR=1e-6 "
            "bash preflight_lr.sh"
        ),
    )
    p.add_argument("--pool", type=_positive_int, default=_env("POOL", None),
                   help="prompts in the pool (env POOL; default: rows of --pool-file)")
    p.add_argument("--pool-file", default=_env("POOL_FILE", "data/sft_rl_pool.jsonl"),
                   help="JSONL pool counted when --pool/POOL is not given (env POOL_FILE)")
    p.add_argument("--n-samples", type=_positive_int, default=_env("NS", "8"),
                   help="--n_samples_per_prompt (env NS, default 8)")
    p.add_argument("--train-batch-size", type=_positive_int, default=_env("TBS", "16"),
                   help="--train_batch_size, samples per optimizer step (env TBS, default 16)")
    p.add_argument("--episodes", type=_positive_int, default=_env("EP", "20"),
                   help="--num_episodes (env EP, default 20)")
    p.add_argument("--warmup", type=_ratio, default=_env("WARMUP", "0.01"),
                   help="--lr_warmup_ratio (env WARMUP, default 0.01)")
    p.add_argument("--lr", type=_positive_float, default=_env("LR", "5e-7"),
                   help="--actor_learning_rate (env LR, default 5e-7)")
    p.add_argument("--rollout-batch-size", type=_positive_int, default=_env("RBS", "16"),
                   help="--rollout_batch_size, prompts per rollout (env RBS, default 16)")
    p.add_argument("--max-epochs", type=_positive_int, default=_env("MAX_EPOCHS", "1"),
                   help="--max_epochs (env MAX_EPOCHS, default 1)")
    p.add_argument("--max-samples", type=_positive_int, default=_env("MAX_SAMPLES", "400"),
                   help="--max_samples, prompts kept from the pool (env MAX_SAMPLES, default 400; "
                        "OpenRLHF's own default is 1e8, i.e. all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also write the whole schedule as a PNG (needs matplotlib; skipped with a warning "
                        "without it; a folder that is missing or not writable is bad input)")
    return p


def shape_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunShape:
    """Resolve the pool size (counting the pool file when no size is given).

    argparse converts string defaults (the environment variables) with each option's
    type, so a bad ``LR=abc`` fails like a bad ``--lr abc``.
    """
    pool = args.pool
    if pool is None:
        try:
            pool = count_rows(args.pool_file)
        except OSError as exc:
            parser.error(f"no pool size: set POOL or --pool, or create {args.pool_file} ({exc.strerror})")
        if pool < 1:
            parser.error(f"{args.pool_file} has no rows: regenerate it with prepare_sft_data.py")
    return RunShape(
        pool=pool,
        n_samples_per_prompt=args.n_samples,
        train_batch_size=args.train_batch_size,
        num_episodes=args.episodes,
        lr_warmup_ratio=args.warmup,
        actor_learning_rate=args.lr,
        rollout_batch_size=args.rollout_batch_size,
        max_epochs=args.max_epochs,
        max_samples=args.max_samples,
    )


def resolve_env_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Convert the values that came from environment variables, naming the variable on error."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not isinstance(value, FromEnv):
            continue
        try:
            setattr(args, action.dest, action.type(value.text) if action.type else value.text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"{value.name}={value.text}: {exc} (the variable stands for {action.option_strings[0]})")


def plot_target_problem(path: str) -> str | None:
    """Why ``path`` cannot take the PNG (its folder missing or not writable), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--plot {path}: is a folder; give a file name such as {os.path.join(path, 'lr_schedule.png')}"
    if not os.path.isdir(folder):
        return f"--plot {path}: folder {folder} does not exist; create it or choose another path"
    if not os.access(folder, os.W_OK):
        return f"--plot {path}: folder {folder} is not writable; choose another path"
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the schedule; return 0 when it passes, 1 when it must not be launched, 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_env_defaults(args, parser)
    if args.plot and plot_target_problem(args.plot):
        parser.error(plot_target_problem(args.plot))
    shape = shape_from_args(args, parser)
    report = build_report(shape)
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True))
    else:
        print(format_report(report, shape))
    if args.plot and report.total_steps >= 1:
        try:
            plot_schedule(shape, args.plot)
        except ImportError:
            print(f"plot: matplotlib is not installed; {args.plot} not written", file=sys.stderr)
        except OSError as exc:
            print(f"preflight_lr.sh: --plot {args.plot}: cannot write it ({exc.strerror}); choose another path",
                  file=sys.stderr)
            return 2
    return 1 if report.reasons else 0


if __name__ == "__main__":
    sys.exit(main())
