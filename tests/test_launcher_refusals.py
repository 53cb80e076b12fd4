"""Every broken precondition of a launch is refused in one line, before anything is created.

Each case below breaks one thing (a setting, a flag, a row of the data, a storage root) and runs
``train_grpo_20b.sh --dry-run`` in the test bed of ``tests/test_launchers.py`` (fake tools, the
patched OpenRLHF tree first on the launcher's path). The list holds the launcher cases of the
bad-input report (numbers with units, ``abc``, zero and negative counts, ``--dryrun``, unknown
flags, a flag without its value, ``--packing_samples``, pool rows broken anywhere, a missing
mount) and, beyond them, ``abc`` for every setting the launchers read as a number.

What every case must show: exit status 2 (3 for the machine), exactly one line on stderr that
names the setting, flag or file, and no file or folder created under the bed or in TMPDIR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rft.launch_tools import SETTINGS
from test_launchers import LAUNCHERS, Bed

# A setting the user types with a unit or a word; the line must name the variable.
UNITS = [
    ("MIN_FREE_GB_DATA", "50GB"), ("MIN_FREE_GB_SCRATCH", "20G"), ("HOST_GIB_PER_LOAD", "41GiB"),
    ("MAX_GPU_MEM_USED_MIB", "2GiB"), ("GENERATE_MAX_LEN", "4k"), ("LR", "5e-7/s"),
]
ZERO_OR_NEGATIVE = [
    ("SAVE_STEPS", "0"), ("LORA_RANK", "0"), ("ACTOR_GPUS_PER_NODE", "0"), ("MICRO_TRAIN_BATCH_SIZE", "0"),
    ("N_SAMPLES", "0"), ("TRAIN_BATCH_SIZE", "0"), ("ROLLOUT_BATCH_SIZE", "0"), ("NUM_EPISODES", "0"),
    ("VLLM_NUM_ENGINES", "0"), ("VLLM_TP", "0"), ("MAX_SAMPLES", "0"), ("GENERATE_MAX_LEN", "0"),
    ("MAX_EPOCHS", "-1"), ("EVAL_STEPS", "-5"), ("MIN_FREE_GB_DATA", "-1"), ("HOST_GIB_PER_LOAD", "-41"),
    ("LORA_ALPHA", "0"), ("MICRO_ROLLOUT_BATCH_SIZE", "0"),
]
OUT_OF_RANGE = [
    ("OFFLOAD", "yes"), ("RAY_STOP_ON_EXIT", "true"), ("LR", "1e9"), ("LR", "0"), ("LR", "nan"),
    ("EPS_CLIP", "2"), ("WARMUP_RATIO", "1.5"), ("VLLM_GPU_MEM_UTIL", "1.2"), ("TEMPERATURE", "0"),
    ("INIT_KL_COEF", "-0.1"), ("RAY_DASHBOARD_PORT", "70000"), ("MAX_SAMPLES", "4.0"),
]
SETTING_CASES = ([(name, "abc") for name in SETTINGS] + UNITS + ZERO_OR_NEGATIVE + OUT_OF_RANGE)

# Arguments after the script: (arguments, what the line must say).
ARGUMENT_CASES = [
    (["--dryrun"], "argument --dryrun: not a launcher option; write --dry-run"),
    (["--dry_run"], "argument --dry_run: not a launcher option; write --dry-run"),
    (["--bogus_flag"], "argument --bogus_flag: not an option of openrlhf.cli.train_ppo_ray"),
    (["--eps_clip"], "argument --eps_clip: expected one argument"),
    (["--eps_clip", "--lora_alpha", "16"], "argument --eps_clip: expected one argument"),
    (["--packing_samples"], "--packing_samples: OpenRLHF then switches attention to FlashAttention-2"),
    (["--use_dynamic_batch"], "--packing_samples: OpenRLHF then switches attention to FlashAttention-2"),
    (["--num_episode", "50"], "argument --num_episode: write it in full (--num_episodes)"),
    (["--lora_rank", "0"], "--lora_rank 0 (setting LORA_RANK): must be at least 1"),
    (["--lora_rank", "abc"], "argument --lora_rank: invalid int value: 'abc'"),
    (["--save_steps", "0"], "--save_steps 0 (setting SAVE_STEPS): must be at least 1"),
    (["--micro_train_batch_size", "0"], "--micro_train_batch_size 0 (setting MICRO_TRAIN_BATCH_SIZE)"),
    (["--actor_learning_rate", "1e9"], "--actor_learning_rate 1e+09 (setting LR): must be above 0 and at most 0.01"),
    (["--lr_scheduler", "linear"], "--lr_scheduler linear: OpenRLHF 0.9.3 passes min_lr to every scheduler"),
    (["--enable_ema"], "--enable_ema: OpenRLHF 0.9.3's EMA update"),
    (["--remote_rm_url", "no_reward.py"], "reward: "),
    (["--prompt_data", "missing.jsonl"], "data: "),
]


def _valid_rows(n: int) -> list[str]:
    return [json.dumps({"input": f"What is {i} + 1?", "label": str(i + 1)}) for i in range(n)]


# Broken data: a function that breaks the bed's pool (or eval set), and what the line must say.
def _row6_without_label(bed: Bed) -> None:
    rows = _valid_rows(10)
    rows[5] = json.dumps({"input": "What is 6?"})
    bed.pool.write_text("\n".join(rows) + "\n")


def _torn_last_line(bed: Bed) -> None:
    bed.pool.write_text("\n".join(_valid_rows(10)) + '\n{"input": "What is 1', encoding="utf-8")


def _non_utf8(bed: Bed) -> None:
    bed.pool.write_bytes(("\n".join(_valid_rows(3)) + "\n").encode() + b'{"input": "caf\xe9", "label": "1"}\n')


def _null_label(bed: Bed) -> None:
    bed.pool.write_text("\n".join(_valid_rows(9) + [json.dumps({"input": "q", "label": None})]) + "\n")


def _empty_input(bed: Bed) -> None:
    bed.pool.write_text("\n".join(_valid_rows(4) + [json.dumps({"input": " ", "label": "2"})]) + "\n")


def _not_an_object(bed: Bed) -> None:
    bed.pool.write_text("\n".join(_valid_rows(4) + ['["q", "2"]']) + "\n")


def _pool_is_a_folder(bed: Bed) -> None:
    bed.pool.unlink()
    bed.pool.mkdir()


def _eval_row_broken(bed: Bed) -> None:
    bed.eval.write_text("\n".join(_valid_rows(20) + [json.dumps({"input": "q", "label": True})]) + "\n")


DATA_CASES = [
    (_row6_without_label, "sft_rl_pool.jsonl: line 6 has no label"),
    (_torn_last_line, "sft_rl_pool.jsonl: line 11 is not JSON"),
    (_non_utf8, "sft_rl_pool.jsonl: line 4 is not UTF-8"),
    (_null_label, "sft_rl_pool.jsonl: line 10 has label = null, not text"),
    (_empty_input, "sft_rl_pool.jsonl: line 5 has an empty input"),
    (_not_an_object, "sft_rl_pool.jsonl: line 5 is not a JSON object"),
    (_pool_is_a_folder, "sft_rl_pool.jsonl: is a directory, not a JSONL file"),
    (_eval_row_broken, "probe_set_200_ood.jsonl: line 21 has label = true, not text"),
]


@pytest.fixture
def bed(tmp_path, patched_root) -> Bed:
    bed = Bed(tmp_path, patched_root)
    (tmp_path / "tmp").mkdir()
    bed.env["TMPDIR"] = str(tmp_path / "tmp")
    return bed


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (folders 0): what a refusal must leave as it was.

    ``patches.args`` is the fake apply_patches.sh's own record of its call, not the launcher's.
    """
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0) for p in sorted(root.rglob("*"))
            if p.name != "patches.args"}


def refused(bed: Bed, *args: str, code: int = 2, **env: str) -> str:
    """Run a dry run that must be refused; return its one line after checking nothing was created."""
    before = tree(bed.root)
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", *args, **env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("train_grpo_20b: ") and "Traceback" not in proc.stdout + proc.stderr
    assert tree(bed.root) == before, "a refused launch created or changed files"
    return lines[0]


def test_the_list_covers_the_reported_cases():
    """The bad-input report's 67 launcher cases are in here, among the rest."""
    assert len(SETTING_CASES) + len(ARGUMENT_CASES) + len(DATA_CASES) + 2 >= 67
    named = {f"{n}={v}" for n, v in SETTING_CASES}
    assert {"MIN_FREE_GB_DATA=50GB", "HOST_GIB_PER_LOAD=41GiB", "MAX_SAMPLES=abc", "SAVE_STEPS=0",
            "LORA_RANK=0", "OFFLOAD=yes", "ACTOR_GPUS_PER_NODE=0", "MICRO_TRAIN_BATCH_SIZE=0", "LR=1e9"} <= named
    for name in ("INIT_KL_COEF", "LORA_RANK", "GENERATE_MAX_LEN", "TEMPERATURE", "SAVE_STEPS", "EVAL_STEPS",
                 "VLLM_TP", "EPS_CLIP"):
        assert f"{name}=abc" in named


@pytest.mark.parametrize("name, value", SETTING_CASES, ids=[f"{n}={v}" for n, v in SETTING_CASES])
def test_a_bad_setting_is_refused_by_name(bed, name, value):
    line = refused(bed, **{name: value})
    assert f"{name}={value}" in line or f"(setting {name})" in line, line


@pytest.mark.parametrize("args, says", ARGUMENT_CASES, ids=[" ".join(a) for a, _ in ARGUMENT_CASES])
def test_a_bad_argument_is_refused(bed, args, says):
    line = refused(bed, *args)
    assert says in line, line


@pytest.mark.parametrize("breaks, says", DATA_CASES, ids=[f.__name__.strip("_") for f, _ in DATA_CASES])
def test_a_bad_row_anywhere_in_the_data_is_refused(bed, breaks, says):
    breaks(bed)
    line = refused(bed)
    assert line.startswith("train_grpo_20b: data: ") and says in line, line
    assert line.endswith("; regenerate it with: python prepare_sft_data.py")


@pytest.mark.parametrize("root", ["DATA_ROOT", "SCRATCH_ROOT"])
def test_a_missing_mount_is_refused_and_not_created(bed, root):
    """Default paths on a machine without the disk: /mnt/scratch/rft_metrics/... must not appear."""
    missing = bed.root / "mnt" / root.lower()
    line = refused(bed, **{root: str(missing)})
    assert line == (f"train_grpo_20b: {root}={missing} does not exist (is the disk mounted?); mount it, "
                    f"or set {root} to an existing directory")


def test_a_dry_run_that_passes_leaves_no_temp_file(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.listdir(bed.root / "tmp") == []
