"""rft/launch_tools.py's checks as plain functions: settings, rows, paths, and the real parser.

The parser tests run ``parse_train_argv`` on the ``train_ppo_ray.py`` of the pristine and the
patched OpenRLHF 0.9.3 trees (``tests/oprl.py``), the file a node runs.
"""

from __future__ import annotations

import json
import math

import pytest

from rft import launch_tools as lt
from parser_util import parse_train_args

TRAIN = lt.TRAIN_FILE
# What every rft command has: a reward file, ZeRO-3, LoRA, vLLM engines, adapter saves.
MINIMAL = ["--pretrain", "openai/gpt-oss-20b", "--remote_rm_url", "/r.py", "--zero_stage", "3", "--lora_rank", "8",
           "--vllm_num_engines", "2", "--save_steps", "10"]


# ---- settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, line", [
    ("MIN_FREE_GB_DATA", "50GB",
     "MIN_FREE_GB_DATA=50GB: not a whole number; write it without a unit (the unit is in the name) "
     "as in MIN_FREE_GB_DATA=50"),
    ("HOST_GIB_PER_LOAD", "41GiB",
     "HOST_GIB_PER_LOAD=41GiB: not a whole number; write it without a unit (the unit is in the name) "
     "as in HOST_GIB_PER_LOAD=41"),
    ("MAX_SAMPLES", "abc", "MAX_SAMPLES=abc: not a whole number; write it as in MAX_SAMPLES=400"),
    ("MAX_SAMPLES", "4e2", "MAX_SAMPLES=4e2: not a whole number; write it as in MAX_SAMPLES=400"),
    ("LR", "abc", "LR=abc: not a number; write it as in LR=5e-7"),
    ("LR", "inf", "LR=inf: not a number; write it as in LR=5e-7"),
    ("OFFLOAD", "yes", "OFFLOAD=yes: must be 0 or 1; for example OFFLOAD=1"),
    ("RAY_DASHBOARD_PORT", "0",
     "RAY_DASHBOARD_PORT=0: must be at least 1 and at most 65535; for example RAY_DASHBOARD_PORT=8265"),
    ("MIN_FREE_GB_SCRATCH", "-1", "MIN_FREE_GB_SCRATCH=-1: must be at least 0; for example MIN_FREE_GB_SCRATCH=20"),
])
def test_a_bad_setting_is_one_line_naming_it(name, text, line):
    assert lt.check_setting(name, text) == line


@pytest.mark.parametrize("name, text", [("LR", "1e9"), ("SAVE_STEPS", "0"), ("LORA_RANK", "0")])
def test_flag_settings_leave_their_bounds_to_the_parsed_command(name, text):
    """LR=1e9 is a number: its bound is checked on --actor_learning_rate, wherever the value came from."""
    assert lt.check_setting(name, text) is None


def test_every_example_is_accepted():
    assert set(lt.EXAMPLES) == set(lt.SETTINGS)
    for name, text in lt.EXAMPLES.items():
        assert lt.check_setting(name, text) is None, name
        rule = lt.SETTINGS[name]
        if rule.kind is not str:
            assert not lt.out_of_bounds(lt.read_number(text, rule), rule), name


def test_check_settings_returns_the_first_refusal_and_skips_unknown_names():
    assert lt.check_settings({"RUN_NAME": "x", "LR": "1e-6", "SEED": "s"}).startswith("SEED=s: ")
    assert lt.check_settings({"RUN_NAME": "anything"}) is None


# ---- data rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("line, problem", [
    (b'{"input": "q", "label": "7"}', None),
    (b'{"input": "q", "label": 7}', None),
    (b'{"input": "q"}', "has no label (found input)"),
    (b'{"input": "q", "label": null}', "has label = null, not text"),
    (b'{"input": "q", "label": false}', "has label = false, not text"),
    (b'{"input": "", "label": "7"}', "has an empty input"),
    (b'{"input": "q", "lab', "is not JSON (Unterminated string starting at; a torn or partly written line?)"),
    (b'{"input": "caf\xe9", "label": "1"}', "is not UTF-8 (byte 14)"),
    (b'[1, 2]', "is not a JSON object"),
])
def test_check_row(line, problem):
    assert lt.check_row(line, ["input", "label"]) == problem


def test_check_data_reads_every_row_and_names_the_line(tmp_path):
    pool = tmp_path / "pool.jsonl"
    rows = [json.dumps({"input": f"q{i}", "label": str(i)}) for i in range(8)]
    pool.write_text("\n".join(rows) + "\n\n")
    assert lt.check_data(str(pool), ["input", "label"]) == 8
    rows[5] = json.dumps({"input": "q5"})
    pool.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as err:
        lt.check_data(str(pool), ["input", "label"])
    assert str(err.value) == (f"{pool}: line 6 has no label (found input); "
                              "regenerate it with: python prepare_sft_data.py")


# ---- launcher options, paths, mounts -----------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["--dryrun"], "argument --dryrun: not a launcher option; write --dry-run"),
    (["--eps_clip", "0.2", "--Dry_Run"], "argument --Dry_Run: not a launcher option; write --dry-run"),
    (["--help_me"], None),
    (["--eps_clip", "0.2"], None),
    (["--use_wandb", "dryrun"], None),  # a value, not an option
    (["-help"], "argument -help: not a launcher option; write --help"),
])
def test_launcher_typo(args, line):
    assert lt.launcher_typo(args) == line


def test_absolute_paths_rewrites_path_values_only():
    argv = ["--prompt_data", "d/pool.jsonl", "--eval_dataset=e.jsonl", "--remote_rm_url", "http://rm:5000",
            "--save_path", "/abs/out", "--pretrain", "openai/gpt-oss-20b", "--ckpt_path", "--seed"]
    assert lt.absolute_paths(argv, "/work", exists=lambda p: False) == [
        "--prompt_data", "/work/d/pool.jsonl", "--eval_dataset=/work/e.jsonl", "--remote_rm_url", "http://rm:5000",
        "--save_path", "/abs/out", "--pretrain", "openai/gpt-oss-20b", "--ckpt_path", "--seed"]
    # a --pretrain that exists as a local folder is a path, a hub id is not
    assert lt.absolute_paths(["--pretrain", "models/m"], "/w", exists=lambda p: p == "/w/models/m") == [
        "--pretrain", "/w/models/m"]


def test_missing_root_only_for_a_root_a_path_lies_under():
    roots = {"DATA_ROOT": "/mnt/data", "SCRATCH_ROOT": "/mnt/scratch"}
    paths = {"save": "/mnt/data/out/run", "metrics": "/elsewhere/m"}
    assert lt.missing_root(paths, roots, isdir=lambda p: False) == (
        "DATA_ROOT=/mnt/data does not exist (is the disk mounted?); mount it, or set DATA_ROOT to an existing directory")
    assert lt.missing_root(paths, roots, isdir=lambda p: p == "/mnt/data") is None
    assert lt.missing_root({"x": "/mnt/database/x"}, roots, isdir=lambda p: False) is None  # a sibling, not under


# ---- the real parser ---------------------------------------------------------------------
def test_parse_equals_the_tests_parser_on_both_trees(pristine_root, patched_root):
    """The launcher's parse is the file's own: the same namespace as tests/parser_util.py gets."""
    argv = MINIMAL + ["--eps_clip", "0.2", "--lora_rank", "8", "--lora_alpha", "16", "--max_samples", "400"]
    for root in (pristine_root, patched_root):
        ns, notes = lt.parse_train_argv(argv, root / "openrlhf" / TRAIN)
        assert vars(ns) == vars(parse_train_args(root, argv))
        assert (ns.eps_clip, ns.eps_clip_low_high, ns.lora_alpha) == (0.2, (0.2, 0.2), 16)


def test_parse_refuses_what_the_parser_refuses(pristine_root, patched_root):
    with pytest.raises(lt.Refusal, match=r"^argument --offload: not an option of openrlhf.cli.train_ppo_ray"):
        lt.parse_train_argv(MINIMAL + ["--offload"], pristine_root / "openrlhf" / TRAIN)
    assert lt.parse_train_argv(MINIMAL + ["--offload"], patched_root / "openrlhf" / TRAIN)[0].offload is True
    with pytest.raises(lt.Refusal) as err:
        lt.parse_train_argv(MINIMAL + ["--eps_clip"], patched_root / "openrlhf" / TRAIN)
    assert str(err.value).startswith("argument --eps_clip: expected one argument; ") and err.value.code == 2


def test_parse_refuses_what_the_validation_asserts(patched_root):
    argv = MINIMAL + ["--advantage_estimator", "rloo", "--n_samples_per_prompt", "1"]
    with pytest.raises(lt.Refusal, match="^arguments: OpenRLHF refuses them: rloo requires n_samples_per_prompt > 1$"):
        lt.parse_train_argv(argv, patched_root / "openrlhf" / TRAIN)


def test_bounds_are_checked_before_the_validation(patched_root):
    """--n_samples_per_prompt 0 would first trip an assert that names no flag."""
    assert lt.parse_train_argv(MINIMAL, patched_root / "openrlhf" / TRAIN, lt.check_bounds)[0].lora_rank == 8
    with pytest.raises(lt.Refusal, match=r"^--n_samples_per_prompt 0 \(setting N_SAMPLES\): must be at least 1"):
        lt.parse_train_argv(MINIMAL + ["--n_samples_per_prompt", "0"], patched_root / "openrlhf" / TRAIN,
                            lt.check_bounds)


@pytest.mark.parametrize("extra, start", [
    (["--packing_samples"], "--packing_samples: OpenRLHF then switches attention to FlashAttention-2"),
    (["--ring_attn_size", "2"], "--packing_samples: "),
    (["--enable_ema"], "--enable_ema: "),
    (["--lr_scheduler", "cosine"], "--lr_scheduler cosine: "),
    ([], "reward: /r.py not found"),
])
def test_check_namespace(patched_root, extra, start):
    ns, _ = lt.parse_train_argv(MINIMAL + extra, patched_root / "openrlhf" / TRAIN)
    assert lt.check_namespace(ns).startswith(start)


def test_a_count_left_unset_is_refused_and_an_unset_coefficient_is_off(patched_root):
    argv = [a for a in MINIMAL if a not in ("--vllm_num_engines", "2")]
    ns, _ = lt.parse_train_argv(argv, patched_root / "openrlhf" / TRAIN)
    assert lt.check_bounds(ns) == ("--vllm_num_engines is not set (setting VLLM_NUM_ENGINES); rft needs it: "
                                   "give --vllm_num_engines 2")
    ns, _ = lt.parse_train_argv(MINIMAL, patched_root / "openrlhf" / TRAIN)
    assert ns.entropy_loss_coef is None and lt.check_bounds(ns) is None


def test_namespace_record_is_json_and_hides_secrets(patched_root):
    ns, _ = lt.parse_train_argv(MINIMAL + ["--use_wandb", "sekret"], patched_root / "openrlhf" / TRAIN)
    record = lt.namespace_record(ns)
    text = json.dumps(record, allow_nan=False)
    assert "sekret" not in text and record["use_wandb"] == lt.REDACTED
    assert record["max_samples"] == 1e8 and record["remote_rm_url"] == ["/r.py"]


def test_shell_values():
    assert lt.shell_value(None) == "" and lt.shell_value(1e8) == "100000000" and lt.shell_value(5e-7) == "5e-07"
    assert lt.shell_value(["/a.py", "/b.py"]) == "/a.py,/b.py" and lt.shell_value(0.0) == "0.0"
    assert not math.isnan(float(lt.shell_value(0.01)))
