"""preflight_lr.sh / rft.lr_schedule against OpenRLHF 0.9.3's real step count and scheduler.

The reference values come from the code that runs in training, not from a transcription:
the ``max_steps`` expression and the ``get_scheduler(...)`` call are read out of the patched
OpenRLHF tree with ``ast`` and evaluated with transformers' real ``get_scheduler`` on a real
torch optimizer; the rollout count comes from the real ``_collect_prompt_batch``; and one
group of tests runs the real ``prepare_datasets`` on JSONL files.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.trainer import get_scheduler

import oprl
from rft import lr_schedule as ls

REPO = Path(__file__).resolve().parents[1]
PREFLIGHT = REPO / "preflight_lr.sh"
PPO_ACTOR = Path("openrlhf/trainer/ray/ppo_actor.py")
PPO_TRAINER = Path("openrlhf/trainer/ppo_trainer.py")
N_CONFIGS = 300


# ---- the real expressions, read out of the OpenRLHF tree ---------------------------------
def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no function {name}")


def real_scheduler_call(root: Path) -> str:
    """Source of the ``get_scheduler(...)`` call that builds the actor's scheduler."""
    src = (root / PPO_ACTOR).read_text()
    fn = _function(ast.parse(src), "init_model_from_pretrained")
    calls = [
        n for n in ast.walk(fn)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "get_scheduler"
    ]
    assert len(calls) == 1, "expected one get_scheduler call in PolicyModelActor.init_model_from_pretrained"
    return ast.get_source_segment(src, calls[0])


def real_max_steps_expr(root: Path) -> tuple[str, str]:
    """Sources of the prompt-count bound and the ``max_steps`` expression in prepare_datasets."""
    src = (root / PPO_TRAINER).read_text()
    fn = _function(ast.parse(src), "prepare_datasets")
    bound = max_steps = None
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            if target == "max_steps":
                max_steps = ast.get_source_segment(src, node.value)
            if target == "train_data" and isinstance(node.value, ast.Call) and bound is None:
                seg = ast.get_source_segment(src, node.value)
                if ".select(" in seg:
                    bound = ast.get_source_segment(src, node.value.args[0])
    assert bound and max_steps
    return bound, max_steps


@pytest.fixture(scope="module")
def real_code(patched_root):
    return {"scheduler": real_scheduler_call(patched_root), "steps": real_max_steps_expr(patched_root)}


def random_shapes(n: int, seed: int = 20261125) -> list[ls.RunShape]:
    """Configurations around the real ones: small and odd pools, every batch geometry."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        ns = rng.choice([1, 2, 4, 8, 16])
        tbs = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        shapes.append(ls.RunShape(
            pool=rng.randint(1, 1200),
            n_samples_per_prompt=ns,
            train_batch_size=tbs,
            num_episodes=rng.randint(1, 6),
            lr_warmup_ratio=rng.choice([0.0, 1.0, round(rng.uniform(0, 0.3), 4), rng.uniform(0, 1)]),
            actor_learning_rate=10 ** rng.uniform(-8, -3),
            rollout_batch_size=rng.choice([1, 3, 8, 16, 32, 100]),
            max_epochs=rng.randint(1, 3),
            max_samples=rng.choice([ls.DEFAULT_MAX_SAMPLES, rng.randint(1, 1200)]),
        ))
    return shapes


def args_for(shape: ls.RunShape) -> argparse.Namespace:
    """The OpenRLHF arguments the real expressions read (defaults for the rest)."""
    return argparse.Namespace(
        lr_scheduler="cosine_with_min_lr",
        actor_learning_rate=shape.actor_learning_rate,
        lr_warmup_ratio=shape.lr_warmup_ratio,
        n_samples_per_prompt=shape.n_samples_per_prompt,
        train_batch_size=shape.train_batch_size,
        num_episodes=shape.num_episodes,
        max_epochs=shape.max_epochs,
        max_samples=shape.max_samples,
    )


def real_max_steps(real_code, shape: ls.RunShape) -> int:
    bound_src, steps_src = real_code["steps"]
    args = args_for(shape)
    kept = eval(bound_src, {"min": min, "len": len, "range": range}, {"args": args, "train_data": range(shape.pool)})  # noqa: S307
    return eval(steps_src, {"len": len}, {"args": args, "prompts_dataset": range(len(kept))})  # noqa: S307


def real_scheduler(real_code, shape: ls.RunShape, max_steps: int):
    param = torch.nn.Parameter(torch.zeros(1))
    optim = torch.optim.AdamW([param], lr=shape.actor_learning_rate)
    env = {"get_scheduler": get_scheduler, "math": math, "args": args_for(shape),
           "actor_optim": optim, "max_steps": max_steps}
    return optim, eval(real_code["scheduler"], env)  # noqa: S307


def test_the_extracted_call_is_the_one_documented(real_code):
    call = real_code["scheduler"]
    assert "args.lr_scheduler" in call and "math.ceil(max_steps * args.lr_warmup_ratio)" in call
    assert '"min_lr": args.actor_learning_rate * 0.1' in call


def test_step_count_equals_openrlhf_formula(real_code):
    shapes = random_shapes(N_CONFIGS)
    for shape in shapes:
        assert ls.total_steps(shape) == real_max_steps(real_code, shape), shape


def test_lr_at_every_step_equals_real_scheduler(real_code):
    """>= 200 configurations, every step of each, to 1e-9 relative (0 exactly where it is 0)."""
    checked = 0
    for shape in random_shapes(N_CONFIGS):
        total = real_max_steps(real_code, shape)
        if total < 1 or total > 4000:  # keep the run time small; long runs are the same formula
            continue
        optim, sched = real_scheduler(real_code, shape, total)
        assert ls.warmup_steps(shape) == sched.lr_lambdas[0].keywords["num_warmup_steps"]
        for step in range(1, total + 1):
            want = optim.param_groups[0]["lr"]  # what update `step` applies
            got = ls.lr_at(shape, step)
            assert got == pytest.approx(want, rel=1e-9, abs=0.0), (shape, step)
            optim.step()
            sched.step()
        checked += 1
    assert checked >= 200


def test_long_run_sampled_steps_match(real_code):
    """The 20b default (4000 updates) and one episode of the whole 50k pool (25,000), at sampled steps."""
    for shape in (
        ls.RunShape(pool=50_000, n_samples_per_prompt=8, train_batch_size=16, num_episodes=20,
                    lr_warmup_ratio=0.01, actor_learning_rate=5e-7, rollout_batch_size=16, max_samples=400),
        ls.RunShape(pool=50_000, n_samples_per_prompt=8, train_batch_size=16, num_episodes=1,
                    lr_warmup_ratio=0.05, actor_learning_rate=5e-7, rollout_batch_size=16),
    ):
        total = real_max_steps(real_code, shape)
        optim, sched = real_scheduler(real_code, shape, total)
        probe = {1, 2, 20, total // 3, total} | set(range(1, total + 1, max(1, total // 997)))
        for step in range(1, total + 1):
            if step in probe:
                assert ls.lr_at(shape, step) == pytest.approx(optim.param_groups[0]["lr"], rel=1e-9, abs=0.0)
            optim.step()
            sched.step()


def test_rollouts_per_episode_match_the_sample_generator(patched_root, vllm_stub):
    """Full rollout batches counted by running the real _collect_prompt_batch until it is exhausted."""
    em = oprl.load(patched_root, "openrlhf.trainer.ppo_utils.experience_maker")
    rng = random.Random(7)
    for _ in range(60):
        pool, rbs = rng.randint(1, 300), rng.choice([1, 3, 8, 16, 64])
        it = iter([("default", [f"p{i}"], [str(i)]) for i in range(pool)])
        batches = 0
        while True:
            _, _, exhausted = em._collect_prompt_batch(it, rbs)
            if exhausted:
                break
            batches += 1
        shape = ls.RunShape(pool=pool, n_samples_per_prompt=8, train_batch_size=16, num_episodes=1,
                            lr_warmup_ratio=0.0, actor_learning_rate=1e-6, rollout_batch_size=rbs)
        assert ls.rollouts_per_episode(shape) == batches, (pool, rbs)


class _Strategy:
    """Stand-in for DeepspeedStrategy with the three members prepare_datasets touches."""

    def __init__(self, args):
        self.args = args

    def print(self, *a, **k):
        pass

    def is_rank_0(self):
        return True

    def setup_dataloader(self, dataset, *a, **k):
        return dataset


@pytest.mark.slow
def test_real_prepare_datasets_on_jsonl(patched_root, vllm_stub, tmp_path):
    """The whole path: a JSONL pool through OpenRLHF's real loader to max_steps; rows counted alike."""
    trainer = oprl.load(patched_root, "openrlhf.trainer.ppo_trainer")
    for rows, max_samples, ns, tbs, ep, epochs in [
        (400, 400, 8, 16, 20, 1), (400, ls.DEFAULT_MAX_SAMPLES, 8, 16, 1, 1),
        (53, 40, 8, 16, 3, 2), (37, ls.DEFAULT_MAX_SAMPLES, 4, 24, 5, 1),
    ]:
        path = tmp_path / f"pool_{rows}_{max_samples}.jsonl"
        # a trailing blank line, as editors leave them: neither the loader nor the count sees a row
        path.write_text("".join(json.dumps({"input": f"q{i}", "label": str(i)}) + "\n" for i in range(rows)) + "\n")
        args = argparse.Namespace(
            prompt_data=str(path), prompt_data_probs=None, seed=42, max_samples=max_samples,
            prompt_split="train", input_template=None, input_key="input", label_key="label",
            apply_chat_template=False, eval_dataset=None, n_samples_per_prompt=ns,
            train_batch_size=tbs, num_episodes=ep, max_epochs=epochs,
        )
        _, _, max_steps = trainer.prepare_datasets(_Strategy(args), tokenizer=None)
        shape = ls.RunShape(pool=ls.count_rows(str(path)), n_samples_per_prompt=ns, train_batch_size=tbs,
                            num_episodes=ep, lr_warmup_ratio=0.01, actor_learning_rate=1e-6,
                            rollout_batch_size=16, max_epochs=epochs, max_samples=max_samples)
        assert ls.total_steps(shape) == max_steps


# ---- the abort rule ----------------------------------------------------------------------
def _shape(**kw) -> ls.RunShape:
    base = dict(pool=400, n_samples_per_prompt=8, train_batch_size=16, num_episodes=1,
                lr_warmup_ratio=0.05, actor_learning_rate=5e-7, rollout_batch_size=16)
    base.update(kw)
    return ls.RunShape(**base)


def test_abort_rule_at_the_lr_threshold():
    shape = _shape()
    at = ls.MIN_FRACTION * shape.actor_learning_rate
    assert ls.abort_reasons(shape, at) == []
    below = math.nextafter(at, 0.0)
    reasons = ls.abort_reasons(shape, below)
    assert len(reasons) == 1 and "raise LR, lower WARMUP, or use more prompts" in reasons[0]


def test_abort_rule_at_the_step_threshold():
    # 20 prompts x 16 samples // 16 = 20 updates: passes; 19 prompts: 19 updates, refused.
    ok = _shape(pool=20, n_samples_per_prompt=16, rollout_batch_size=1, lr_warmup_ratio=0.0)
    short = _shape(pool=19, n_samples_per_prompt=16, rollout_batch_size=1, lr_warmup_ratio=0.0)
    # (Both also fail the LR rule: step 20 of a 20-step cosine is near min_lr. Only the
    # step-count reason is under test here.)
    assert ls.total_steps(ok) == 20
    assert not any("fewer than 20" in r for r in ls.build_report(ok).reasons)
    report = ls.build_report(short)
    assert ls.total_steps(short) == 19 and report.verdict == "abort"
    assert any("the run has 19 optimizer steps, fewer than 20" in r for r in report.reasons)
    long_ok = _shape(pool=40, n_samples_per_prompt=16, rollout_batch_size=1, lr_warmup_ratio=0.0)
    assert ls.build_report(long_ok).verdict == "ok"


def test_abort_rule_counts_the_updates_the_run_really_takes():
    # 30 prompts in rollouts of 16: one rollout (8 updates), though the scheduler plans 15 x 2 = 30.
    shape = _shape(pool=30, num_episodes=2, lr_warmup_ratio=0.0)
    assert ls.total_steps(shape) == 30 and ls.run_optimizer_steps(shape) == 16
    assert ls.build_report(shape).verdict == "abort"


def _run(env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(PREFLIGHT), *args], capture_output=True, text=True, env=full, cwd=cwd)


def test_cli_warmup_threshold_end_to_end(tmp_path):
    """640 updates: warmup 63 gives LR(20) = 19/63 = 30.2% (runs), warmup 64 gives 29.7% (refused)."""
    base = {"POOL": "640", "NS": "16", "TBS": "16", "EP": "1", "RBS": "16", "LR": "1e-6", "MAX_SAMPLES": "640"}
    ok = _run({**base, "WARMUP": str(63 / 640)}, "--json", cwd=tmp_path)
    bad = _run({**base, "WARMUP": str(64 / 640)}, "--json", cwd=tmp_path)
    ok_j, bad_j = json.loads(ok.stdout), json.loads(bad.stdout)
    assert (ok.returncode, ok_j["verdict"], ok_j["warmup_steps"]) == (0, "ok", 63)
    assert (bad.returncode, bad_j["verdict"], bad_j["warmup_steps"]) == (1, "abort", 64)
    assert bad_j["lr_by_step"]["20"] == pytest.approx(1e-6 * 19 / 64, rel=1e-12)


def test_cli_table_and_json_agree(tmp_path):
    env = {"LR": "5e-7", "WARMUP": "0.05", "POOL": "400", "EP": "1", "NS": "8", "TBS": "16"}
    table = _run(env, cwd=tmp_path)
    data = json.loads(_run(env, "--json", cwd=tmp_path).stdout)
    assert table.returncode == 0, table.stderr
    assert set(data) >= {"total_steps", "warmup_steps", "lr_by_step", "verdict"}
    assert (data["total_steps"], data["warmup_steps"], data["verdict"]) == (200, 10, "ok")
    assert sorted(map(int, data["lr_by_step"])) == [1, 5, 10, 20, 50, 200]
    for step, lr in data["lr_by_step"].items():
        assert f"{int(step):>8}  {lr:>10.3e}" in table.stdout
    assert "end of warmup" in table.stdout and "last step" in table.stdout
    spark = next(l for l in table.stdout.splitlines() if l.startswith("LR 1..200: "))
    assert len(spark.split(": ", 1)[1]) == 60


def test_cli_refuses_the_unbounded_pool_with_the_fix(tmp_path):
    """The notes' table on the whole 50k pool: 500,000 updates, 25,000 of warmup."""
    proc = _run({"POOL": "50000", "MAX_SAMPLES": "100000000", "WARMUP": "0.05"}, cwd=tmp_path)
    assert proc.returncode == 1
    assert "500000 optimizer steps (warmup 25000)" in proc.stdout
    assert "ABORT: LR at step 20" in proc.stdout and "raise LR, lower WARMUP, or use more prompts" in proc.stdout


def test_cli_options_win_over_environment(tmp_path):
    data = json.loads(_run({"POOL": "400", "EP": "1"}, "--json", "--episodes", "3", cwd=tmp_path).stdout)
    assert data["inputs"]["num_episodes"] == 3 and data["total_steps"] == 600


def test_cli_counts_the_pool_file(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": "q", "label": "1"}) + "\n" for _ in range(123)) + "\n\n")
    data = json.loads(_run({"POOL_FILE": str(pool)}, "--json", cwd=tmp_path).stdout)
    assert data["inputs"]["pool"] == 123


@pytest.mark.parametrize("env, args, line", [
    ({"LR": "abc", "POOL": "400"}, [],
     "preflight_lr.sh: LR=abc: must be a positive number, got abc (the variable stands for --lr); "
     "see preflight_lr.sh --help"),
    ({"POOL": "400", "EP": "0"}, [],
     "preflight_lr.sh: EP=0: must be a positive integer, got 0 (the variable stands for --episodes); "
     "see preflight_lr.sh --help"),
    ({"POOL": "400"}, ["--lr", "abc"],
     "preflight_lr.sh: argument --lr: must be a positive number, got abc; see preflight_lr.sh --help"),
    ({"POOL": "400"}, ["--bogus"], "preflight_lr.sh: unrecognized arguments: --bogus; see preflight_lr.sh --help"),
])
def test_cli_bad_input_is_one_line_naming_what_was_typed(tmp_path, env, args, line):
    proc = _run(env, *args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == line + "\n"


def test_cli_bad_input_is_one_clear_error(tmp_path):
    proc = _run({"POOL_FILE": str(tmp_path / "missing.jsonl")}, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "missing.jsonl" in proc.stderr


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_cli_help_says_percent_once(tmp_path, option):
    help_ = _run({}, option, cwd=tmp_path)
    assert help_.returncode == 0 and "POOL" in help_.stdout
    assert "below 30% of the" in " ".join(help_.stdout.split()) and "%%" not in help_.stdout
    assert os.listdir(tmp_path) == []


def test_cli_plot_to_an_unwritable_place_is_bad_input(tmp_path):
    missing = tmp_path / "no" / "lr.png"
    proc = _run({"POOL": "400", "EP": "1", "WARMUP": "0.05"}, "--plot", str(missing), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"preflight_lr.sh: --plot {missing}: folder {missing.parent} does not exist; "
                           "create it or choose another path; see preflight_lr.sh --help\n")
    proc = _run({"POOL": "400", "EP": "1", "WARMUP": "0.05"}, "--plot", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "is a folder; give a file name" in proc.stderr


def test_cli_plot_writes_a_png(tmp_path):
    out = tmp_path / "lr.png"
    proc = _run({"POOL": "400", "EP": "1", "WARMUP": "0.05"}, "--plot", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]  # no temp file left
