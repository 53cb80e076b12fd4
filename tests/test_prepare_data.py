"""Tests of prepare_sft_data.py and rft/data_prep.py on planted fixtures.

Expectations come from the fixture generator's hand-written tags (which stage drops
each planted row, and why) and from checks written here, never from the pipeline's
own helpers. OpenRLHF's real dataset loaders read the outputs. The Hugging Face hub
cannot be reached in tests: the one hub test replaces ``datasets.load_dataset`` (the
network boundary) with a loader of the local fixture and runs everything else.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_sft_data
import reward_func_em
from fixtures.make_numina_fixture import AIME_LEAK, OOD_LEAK, expected_drops, numina_rows, write_fixture
from rft import data_prep as dp

REPO = Path(__file__).resolve().parent.parent
FILLER = 300
SIZES = ["--rl-pool-size", "200", "--sft-size", "50", "--dev-size", "10", "--pool-subset-size", "40",
         "--probe-size", "20", "--ood-size", "8"]
TRAINING = ("sft_rl_pool.jsonl", "sft_train.jsonl", "sft_dev.jsonl")
EVAL = ("probe_set_200_ood.jsonl", "aime_eval.jsonl")
OUTPUTS = TRAINING + EVAL + ("sft_rl_pool_400.jsonl", "probe_set_200.jsonl")


def md5_of_problem(text: str) -> str:
    """The dedup key as the docs define it, written independently of the library."""
    return hashlib.md5(re.sub(r"\s+", " ", text).strip().encode("utf-8")).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory) -> dict[str, Path]:
    return write_fixture(tmp_path_factory.mktemp("numina_fixture"), FILLER)


def run_cli(files: dict[str, Path], out_dir: Path, *extra: str, source: str = "parquet") -> int:
    argv = ["--source", str(files[source]), "--ood-source", str(files["ood"]), "--aime-source",
            str(files["aime"]), "--out-dir", str(out_dir), "--no-progress", *extra]
    return prepare_sft_data.main(argv)


def snapshot(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != dp.OUT_TIMING}


# ---------------------------------------------------------------------------------------------
# Answer, text and solution rules
# ---------------------------------------------------------------------------------------------

ANSWERS = [
    # (dataset answer, canonical label or None)
    ("42", "42"),
    ("  42  ", "42"),                 # spaces around
    ("$42$", "42"),                   # inline math
    ("$$42$$", "42"),                 # display math
    ("\\boxed{42}", "42"),
    ("$\\boxed{42}$", "42"),          # box inside math
    ("\\(42\\)", "42"),
    ("\\boxed{1,000}", "1000"),       # thousands separator inside a box
    ("1,234,567", "1234567"),
    ("1{,}000", "1000"),              # LaTeX comma group
    ("1\\,000", "1000"),              # LaTeX thin space
    ("-17", "-17"),                   # sign kept
    ("+17", "17"),                    # plus dropped
    ("\u221217", "-17"),              # unicode minus
    ("007", "7"),                     # leading zeros
    ("000", "0"),
    ("-0", "0"),
    ("123456789012345678901234567890", "123456789012345678901234567890"),  # no float rounding
    ("1,00", None),                   # bad grouping
    ("1,0000", None),
    ("12,15", None),                  # a list, not 1215
    ("1, 2", None),
    ("\\frac{1}{2}", None),
    ("3/4", None),
    ("2.5", None),
    ("2.0", "2"),                     # the reward reads an integral decimal as the integer
    ("2\\sqrt{3}", None),
    ("x = 5", "5"),                   # forms the reward grades as integers (one grammar)
    ("90^\\circ", "90"),
    ("10\\%", "10"),
    ("", None),
    ("   ", None),
    ("$$", None),
    ("\\boxed{}", None),
    ("proof", None),
    ("notfound", None),
    ("\\boxed{1}\\boxed{2}", None),   # two boxes are not one answer
    ("--5", None),
    ("5-", None),
    ("１２", None),                    # full-width digits are not ASCII digits
]


@pytest.mark.parametrize("answer,label", ANSWERS)
def test_integer_answer_rule(answer, label):
    assert dp.parse_integer_answer(answer) == label


def test_labels_agree_with_the_reward_normalizer():
    """reward_func_em normalizes labels the same way: a canonical label is a fixed point of it,
    and the raw dataset answer it came from matches it."""
    rf = reward_func_em
    accepted = [(raw, label) for raw, label in ANSWERS if label is not None]
    assert len(accepted) >= 15
    for raw, label in accepted:
        assert rf.normalize_answer(label) == label, raw
        assert rf.answers_match(dp.unwrap_answer(raw), label), raw
        assert rf.score_response(f"So the answer is $\\boxed{{{label}}}$.", label)["reward"] == 1.0


@pytest.mark.parametrize("answer,label", ANSWERS)
def test_filter_and_reward_accept_the_same_integers(answer, label):
    """One grammar: the filter keeps an answer exactly when the reward reads it as that integer."""
    read = reward_func_em.normalize_answer(answer)
    reward_reads_integer = re.fullmatch(r"-?[0-9]+", read) is not None
    assert (label is not None) == reward_reads_integer, (answer, read)
    if label is not None:
        assert reward_func_em.answers_match(answer, label)


@pytest.mark.parametrize("answer,reason", [
    ("", "empty"), ("$ $", "empty"), ("proof", "proof/notfound"), ("notfound", "proof/notfound"),
    ("2.5", "decimal"), ("-1,000.25", "decimal"), ("1, 2", "several answers"), ("3; 4", "several answers"),
    ("2 or 3", "several answers"), ("\\frac{1}{2}", "fraction"), ("3/4", "fraction"), ("x^2", "expression or other"),
])
def test_answer_rejection_reasons(answer, reason):
    assert dp.parse_integer_answer(answer) is None
    assert dp.answer_rejection_reason(answer) == reason


def test_nested_wrappers_and_adversarial_answers_stay_fast():
    assert dp.parse_integer_answer("$\\boxed{\\boxed{$7$}}$") == "7"
    deep = "\\boxed{" * 5000 + "1" + "}" * 5000
    assert dp.parse_integer_answer(deep) is None
    assert dp.parse_integer_answer("1," * 50000) is None
    assert dp.parse_integer_answer("{" * 100000) is None


@pytest.mark.parametrize("text,hit", [
    ("(AIME 2019) Find n.", True),
    ("This is AMC 12A problem 5.", True),
    ("From AMC10B.", True),
    ("A problem from the AHSME.", True),
    ("Two AIMEs later...", True),
    ("the american invitational mathematics examination", True),
    ("American Mathematics Competitions 2001", True),
    ("He aimed carefully.", False),
    ("A CAMCORDER costs 200.", False),
    ("AMCHAM members", False),
    ("Dynamic programming", False),
])
def test_amc_aime_text_rule(text, hit):
    assert dp.mentions_amc_aime(text) is hit
    # The pipeline uses the same pattern through pyarrow's RE2 engine: both must agree.
    import pyarrow.compute as pc

    assert pc.match_substring_regex(pa.array([text]), dp.PROBLEM_AMC_AIME_RE)[0].as_py() is hit


def test_problem_hash_ignores_only_whitespace():
    assert dp.problem_hash("Find  the\n sum.\t") == dp.problem_hash("Find the sum.") == md5_of_problem("Find the sum.")
    assert dp.problem_hash("Find the sum.") != dp.problem_hash("find the sum.")


@pytest.mark.parametrize("solution,label,ok", [
    ("So $\\boxed{42}$.", "42", True),
    ("So \\[\\boxed{1,000}\\]\n", "1000", True),
    ("So $\\boxed{042}$", "42", True),
    ("First \\boxed{3}, finally \\boxed{42}.", "42", True),
    ("So $\\boxed{41}$.", "42", False),               # box disagrees with the label
    ("The answer is 42.", "42", False),               # no box
    ("So $\\boxed{42}$. Indeed 42 = 6 * 7.", "42", False),  # text after the box
    ("So $\\boxed{\\frac{84}{2}}$.", "42", False),     # not an integer in the box
    ("So $\\boxed{42", "42", False),                  # unbalanced
])
def test_sft_output_rule(solution, label, ok):
    out = dp.sft_output(solution, label)
    assert (out is not None) is ok
    if ok:
        assert out == solution.rstrip()


# ---------------------------------------------------------------------------------------------
# Stage counts on the planted fixture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_stage_counts_match_planted_cases(fixture_files, tmp_path, fmt):
    assert run_cli(fixture_files, tmp_path, *SIZES, source=fmt) == 0
    report = json.loads((tmp_path / "prep_report.json").read_text())
    planted = numina_rows(FILLER)
    expected = expected_drops(planted, fmt)
    total = sum(1 for p in planted if fmt == "jsonl" or not p.jsonl_only)
    assert report["rows_read"] == total
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["start", *dp.STAGE_NAMES]
    remaining = total
    for stage in stages[1:]:
        want = expected.get(stage["name"], Counter())
        assert stage["reasons"] == dict(want), stage["name"]
        remaining -= sum(want.values())
        assert stage["remaining"] == remaining, stage["name"]
        assert stage["dropped"] == sum(want.values())
    survivors = [p for p in planted if p.drop is None]
    assert stages[-1]["remaining"] == len(survivors)


def test_labels_are_canonical_strings(fixture_files, tmp_path):
    planted = numina_rows(FILLER)
    survivors = {p.row["problem"]: p.label for p in planted if p.drop is None}
    assert run_cli(fixture_files, tmp_path, "--rl-pool-size", str(len(survivors)), "--sft-size", "0",
                   "--dev-size", "0", "--pool-subset-size", "0", "--probe-size", "0", "--ood-size", "8") == 0
    pool = read_jsonl(tmp_path / "sft_rl_pool.jsonl")
    assert {row["input"]: row["label"] for row in pool} == survivors
    for row in pool:
        assert set(row) == {"input", "label"}
        assert isinstance(row["label"], str) and re.fullmatch(r"-?(0|[1-9]\d*)", row["label"])


def test_eval_sets_filtered_and_labelled(fixture_files, tmp_path):
    assert run_cli(fixture_files, tmp_path, *SIZES) == 0
    ood = read_jsonl(tmp_path / "probe_set_200_ood.jsonl")
    aime = read_jsonl(tmp_path / "aime_eval.jsonl")
    # 12 OOD rows: 2 fractions, 1 duplicate and 1 without an answer leave 8.
    assert sorted(r["label"] for r in ood) == sorted(["2", "9", "56", "210", "17", "9", "12", "36"])
    assert {r["datasource"] for r in ood} == {"ood_probe"}
    # AIME: integer answers (some given as JSON numbers), zero-padded strings unpadded.
    assert sorted(r["label"] for r in aime) == sorted(["19", "1", "1", "36", "217", "512"])
    assert {r["datasource"] for r in aime} == {"aime"}
    report = json.loads((tmp_path / "prep_report.json").read_text())
    ood_stages = {s["name"]: s for s in report["eval_sets"]["ood"]["stages"]}
    assert ood_stages["integer_answer"]["reasons"] == {"fraction": 2}
    assert ood_stages["dedup"]["reasons"] == {"duplicate problem": 1}
    assert report["eval_sets"]["ood"]["written"] == 8


def test_ood_sampling_takes_requested_size(fixture_files, tmp_path):
    assert run_cli(fixture_files, tmp_path, *SIZES, "--ood-size", "5") == 0
    assert len(read_jsonl(tmp_path / "probe_set_200_ood.jsonl")) == 5


# ---------------------------------------------------------------------------------------------
# Splits: sizes, zero overlap, formats
# ---------------------------------------------------------------------------------------------


def test_splits_sizes_and_zero_overlap(fixture_files, tmp_path):
    assert run_cli(fixture_files, tmp_path, *SIZES) == 0
    files = {name: read_jsonl(tmp_path / name) for name in OUTPUTS}
    assert [len(files[n]) for n in ("sft_rl_pool.jsonl", "sft_train.jsonl", "sft_dev.jsonl",
                                    "sft_rl_pool_400.jsonl", "probe_set_200.jsonl")] == [200, 50, 10, 40, 20]
    hashes = {name: {md5_of_problem(r["input"]) for r in rows} for name, rows in files.items()}
    for name, rows in files.items():
        assert len(hashes[name]) == len(rows), f"{name} repeats a problem"
    disjoint = TRAINING + EVAL
    for i, a in enumerate(disjoint):
        for b in disjoint[i + 1:]:
            assert not hashes[a] & hashes[b], f"{a} and {b} share problems"
    pool = hashes["sft_rl_pool.jsonl"]
    assert hashes["sft_rl_pool_400.jsonl"] <= pool and hashes["probe_set_200.jsonl"] <= pool
    assert not hashes["sft_rl_pool_400.jsonl"] & hashes["probe_set_200.jsonl"]
    # The planted leaks of eval problems are nowhere in training.
    training = set().union(*(hashes[n] for n in TRAINING))
    assert md5_of_problem(OOD_LEAK) not in training and md5_of_problem(AIME_LEAK) not in training
    report = json.loads((tmp_path / "prep_report.json").read_text())
    assert report["overlap_by_problem_hash"] and not any(report["overlap_by_problem_hash"].values())
    # The subset is the pool's head byte for byte (so --max_samples 400 on the pool reads the same
    # prompts); the ID probe is the next stretch of the pool.
    pool_lines = (tmp_path / "sft_rl_pool.jsonl").read_bytes().splitlines(keepends=True)
    assert (tmp_path / "sft_rl_pool_400.jsonl").read_bytes() == b"".join(pool_lines[:40])
    probe = [{k: v for k, v in r.items() if k != "datasource"} for r in files["probe_set_200.jsonl"]]
    assert probe == files["sft_rl_pool.jsonl"][40:60]
    assert {r["datasource"] for r in files["probe_set_200.jsonl"]} == {"id_probe"}


def test_sft_rows_end_in_boxed_label(fixture_files, tmp_path):
    assert run_cli(fixture_files, tmp_path, *SIZES) == 0
    rows = read_jsonl(tmp_path / "sft_train.jsonl") + read_jsonl(tmp_path / "sft_dev.jsonl")
    assert len(rows) == 60
    for row in rows:
        assert set(row) == {"input", "output", "label"}
        # The last box closes just before the end (only "$", "." or spaces after it) and the
        # reward's own normalizer reads the label in it.
        start = row["output"].rindex("\\boxed{") + len("\\boxed{")
        tail = re.search(r"\}[\s$.]*$", row["output"])
        assert tail and tail.start() >= start, row["output"][-80:]
        assert reward_func_em.normalize_answer(row["output"][start:tail.start()]) == row["label"]
        # The target earns the full training reward for its own label.
        assert reward_func_em.score_response(row["output"], row["label"])["reward"] == 1.0


def test_sft_selection_counts_skipped_solutions(fixture_files, tmp_path):
    """With every problem offered to SFT, the three planted unusable solutions are counted."""
    planted = numina_rows(FILLER)
    survivors = [p for p in planted if p.drop is None]
    usable = sum(p.sft_ok for p in survivors)
    assert run_cli(fixture_files, tmp_path, "--rl-pool-size", "0", "--pool-subset-size", "0", "--probe-size", "0",
                   "--sft-size", str(usable - 5), "--dev-size", "5", "--ood-size", "8") == 0
    sel = json.loads((tmp_path / "prep_report.json").read_text())["sft_selection"]
    assert sel["reasons"] == {"no \\boxed{} in the solution": 1, "last \\boxed{} is not the label": 1,
                              "text follows the last \\boxed{}": 1}
    assert sel["looked_at"] == len(survivors) and sel["remaining"] == usable


def test_openrlhf_reads_outputs_with_input_and_label_keys(fixture_files, tmp_path, monkeypatch):
    """OpenRLHF 0.9.3's own loaders (blending_datasets + PromptDataset), as train_ppo_ray uses them."""
    import datasets

    from oprl import SITE, load

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    out = tmp_path / "data"
    assert run_cli(fixture_files, out, *SIZES) == 0
    utils = load(SITE, "openrlhf.datasets.utils")
    prompts_mod = load(SITE, "openrlhf.datasets.prompts_dataset")

    class Strategy:
        args = Namespace(input_key="input", label_key="label", apply_chat_template=False, use_ms=False)

        def print(self, *a):
            pass

        def is_rank_0(self):
            return True

    for name in ("sft_rl_pool.jsonl", "probe_set_200_ood.jsonl", "aime_eval.jsonl", "probe_set_200.jsonl"):
        data = utils.blending_datasets(str(out / name), None, Strategy(), dataset_split="train")
        dataset = prompts_mod.PromptDataset(data, None, Strategy())
        rows = read_jsonl(out / name)
        assert len(dataset) == len(rows)
        for i, row in enumerate(rows):
            datasource, prompt, label = dataset[i]
            assert prompt == row["input"] and label == row["label"] and isinstance(label, str)
            assert datasource == row.get("datasource", "default")


def test_eval_posthoc_reads_the_eval_files(fixture_files, tmp_path):
    """eval_posthoc.py's loader takes the probe and AIME files as written, labels as strings."""
    from rft.eval_io import load_problems

    assert run_cli(fixture_files, tmp_path, *SIZES) == 0
    for name in ("probe_set_200_ood.jsonl", "aime_eval.jsonl", "probe_set_200.jsonl"):
        rows = read_jsonl(tmp_path / name)
        problems = load_problems(tmp_path / name)
        assert [(p.input, p.label) for p in problems] == [(r["input"], r["label"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Determinism and atomicity
# ---------------------------------------------------------------------------------------------


def test_same_input_and_seed_give_identical_bytes(fixture_files, tmp_path):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    first = snapshot(out)
    assert set(first) == set(OUTPUTS) | {"prep_report.json", "prep_funnel.png"}
    assert first["prep_funnel.png"].startswith(b"\x89PNG") and len(first["prep_funnel.png"]) > 10_000
    assert run_cli(fixture_files, out, *SIZES) == 0
    assert snapshot(out) == first
    report = json.loads(first["prep_report.json"])
    for name in OUTPUTS:
        assert report["outputs"][name]["sha256"] == hashlib.sha256(first[name]).hexdigest()
        assert report["outputs"][name]["rows"] == first[name].count(b"\n")
    assert run_cli(fixture_files, tmp_path / "seed7", *SIZES, "--seed", "7") == 0
    assert (tmp_path / "seed7" / "sft_rl_pool.jsonl").read_bytes() != first["sft_rl_pool.jsonl"]


def test_split_does_not_depend_on_row_order(fixture_files, tmp_path):
    table = pq.read_table(fixture_files["parquet"])
    order = list(range(table.num_rows))
    random.Random(1).shuffle(order)
    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(table.take(order), shuffled)
    files = dict(fixture_files, shuffled=shuffled)
    assert run_cli(files, tmp_path / "a", *SIZES) == 0
    assert run_cli(files, tmp_path / "b", *SIZES, source="shuffled") == 0
    # Dedup keeps the first copy, so a whitespace variant may supply the text after shuffling;
    # compare problems by hash, with their labels, in file order.
    for name in OUTPUTS:
        a = [(md5_of_problem(r["input"]), r["label"]) for r in read_jsonl(tmp_path / "a" / name)]
        b = [(md5_of_problem(r["input"]), r["label"]) for r in read_jsonl(tmp_path / "b" / name)]
        assert a == b, name


def test_failure_mid_write_leaves_previous_outputs(fixture_files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    before = snapshot(out)
    real_write = dp.write_jsonl
    calls = {"n": 0}

    def failing_write(path, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "w") as handle:
                handle.write('{"input": "half a li')
            raise OSError("disk full (injected)")
        return real_write(path, rows)

    monkeypatch.setattr(dp, "write_jsonl", failing_write)
    with pytest.raises(OSError, match="injected"):
        run_cli(fixture_files, out, *SIZES, "--seed", "7")
    assert calls["n"] == 3
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".prep-")]


def test_failure_while_renaming_puts_the_previous_set_back(fixture_files, tmp_path, monkeypatch):
    """A rename fails midway: the files already replaced get their previous versions back."""
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    before = snapshot(out)
    import os

    real_replace = os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:  # the journal, then aime_eval.jsonl and probe_set_200.jsonl were renamed
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(dp.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        run_cli(fixture_files, out, *SIZES, "--seed", "7")
    monkeypatch.setattr(dp.os, "replace", real_replace)
    assert calls["n"] >= 4
    assert snapshot(out) == before
    assert prepare_sft_data.main(["--check", "--out-dir", str(out)]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".prep-")]


_KILLED_RUN = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import prepare_sft_data
target, signum, count = int(os.environ["KILL_AT"]), int(os.environ["KILL_SIG"]), [0]

def killing(real):
    def call(*args, **kwargs):
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    return call

# every change of a name in the output folder is a kill point
os.replace, os.link, os.unlink, os.rmdir = (killing(f) for f in (os.replace, os.link, os.unlink, os.rmdir))
sys.exit(prepare_sft_data.main(sys.argv[1:]))
"""


def _output_set(out: Path) -> dict:
    """The folder's outputs, with the report reduced to what it says of them (its args name the folder)."""
    state = snapshot(out)
    state.pop(dp.OUT_PLOT, None)
    state[dp.OUT_REPORT] = json.loads(state[dp.OUT_REPORT])["outputs"]
    return state


def _killed_at(point: int, signum: int, argv: list[str]) -> subprocess.CompletedProcess:
    import os

    code = _KILLED_RUN.format(repo=str(REPO), tests=str(REPO / "tests"))
    env = {**os.environ, "KILL_AT": str(point), "KILL_SIG": str(signum)}
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_kill_at_any_point_leaves_one_whole_set(fixture_files, tmp_path):
    """SIGKILL at every rename, link and unlink of a second run, SIGTERM and SIGINT at some: afterwards
    (and after --check, which completes an interrupted write) the folder holds the first set or the
    second, whole, and no staging folder."""
    import os
    import signal

    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["--source", str(fixture_files["parquet"]), "--ood-source", str(fixture_files["ood"]), "--aime-source",
            str(fixture_files["aime"]), "--no-progress", *SIZES]
    assert prepare_sft_data.main([*argv, "--out-dir", str(first)]) == 0
    assert prepare_sft_data.main([*argv, "--out-dir", str(second), "--seed", "7"]) == 0
    old, new = _output_set(first), _output_set(second)
    assert old != new
    outcomes = Counter()
    for signum, points in ((signal.SIGKILL, range(1, 80)), (signal.SIGTERM, (3, 11, 14, 20)),
                           (signal.SIGINT, (12, 16, 31))):
        for point in points:
            out = tmp_path / f"kill-{signum}-{point}"
            assert prepare_sft_data.main([*argv, "--out-dir", str(out)]) == 0
            proc = _killed_at(point, signum, [*argv, "--out-dir", str(out), "--seed", "7"])
            finished = proc.returncode == 0
            assert prepare_sft_data.main(["--check", "--out-dir", str(out)]) == 0, (signum, point, proc.stderr[-2000:])
            state = _output_set(out)
            assert state in (old, new), (signum, point)
            assert not [p.name for p in out.iterdir() if p.name.startswith(".prep-")], (signum, point)
            outcomes[(signum, "new" if state == new else "old")] += 1
            if finished:  # the run never reached this point: every point of this signal was tried
                break
    assert outcomes[(signal.SIGKILL, "new")] >= 1 and outcomes[(signal.SIGKILL, "old")] >= 1, outcomes


def test_bad_source_leaves_previous_outputs(fixture_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    before = snapshot(out)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    files = dict(fixture_files, broken=broken)
    capsys.readouterr()
    assert run_cli(files, out, *SIZES, source="broken") == 2
    assert "broken.parquet" in _error_line(capsys)
    assert snapshot(out) == before


def test_check_detects_changed_outputs(fixture_files, tmp_path):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    assert prepare_sft_data.main(["--check", "--out-dir", str(out)]) == 0
    with open(out / "sft_dev.jsonl", "a") as handle:
        handle.write("{}\n")
    assert prepare_sft_data.main(["--check", "--out-dir", str(out)]) == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing written
# ---------------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], lines
    assert lines[-1].startswith("prepare_sft_data.py: error:")
    return lines[-1]


def test_missing_column_is_one_line(fixture_files, tmp_path, capsys):
    table = pq.read_table(fixture_files["parquet"]).drop_columns(["answer"])
    path = tmp_path / "no_answer.parquet"
    pq.write_table(table, path)
    assert run_cli(dict(fixture_files, x=path), tmp_path / "out", *SIZES, source="x") == 2
    line = _error_line(capsys)
    assert "no_answer.parquet" in line and "answer" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_other_string_encodings_and_typed_columns(fixture_files, tmp_path):
    """large_string and dictionary columns read like plain strings; a numeric column is malformed."""
    table = pq.read_table(fixture_files["parquet"])
    recoded = table.set_column(table.schema.get_field_index("source"), "source",
                               table.column("source").dictionary_encode())
    recoded = recoded.set_column(recoded.schema.get_field_index("problem"), "problem",
                                 recoded.column("problem").cast(pa.large_string()))
    pq.write_table(recoded, tmp_path / "recoded.parquet")
    assert pq.read_schema(tmp_path / "recoded.parquet").field("source").type.id == pa.dictionary(
        pa.int32(), pa.string()).id
    files = dict(fixture_files, recoded=tmp_path / "recoded.parquet")
    assert run_cli(files, tmp_path / "a", *SIZES) == 0
    assert run_cli(files, tmp_path / "b", *SIZES, source="recoded") == 0
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    numeric = table.set_column(table.schema.get_field_index("answer"), "answer",
                               pa.array(range(table.num_rows), pa.int64()))
    pq.write_table(numeric, tmp_path / "numeric.parquet")
    files["numeric"] = tmp_path / "numeric.parquet"
    assert run_cli(files, tmp_path / "c", *SIZES, source="numeric") == 2  # nothing left to split
    # The rows were counted as malformed, not crashed on: run the filter directly to see the counts.
    info, batches = dp.open_source(str(files["numeric"]), dp.REQUIRED_COLUMNS, dp.MALFORMED)
    result = dp.filter_rows(batches, 20, {})
    # Each row names its first bad field in column order: the planted null problem comes first.
    assert result.stages[0].reasons == Counter({"answer is int64, not a string": table.num_rows - 1,
                                                "missing problem": 1})


def test_too_few_problems_names_the_flag(fixture_files, tmp_path, capsys):
    assert run_cli(fixture_files, tmp_path / "out", "--ood-size", "8", source="parquet") == 2
    line = _error_line(capsys)
    assert "--rl-pool-size" in line and "50000" in line


def test_missing_source_and_bad_sizes(fixture_files, tmp_path, capsys):
    # The training source is checked before the (default, hub) eval sources are touched.
    assert prepare_sft_data.main(["--source", str(tmp_path / "nope.parquet"), "--out-dir", str(tmp_path)]) == 2
    assert "nope.parquet" in _error_line(capsys)
    # A relative path that looks like owner/name is still a missing file, not a hub id.
    assert prepare_sft_data.main(["--source", "data/numina.parquet", "--out-dir", str(tmp_path)]) == 2
    assert "data/numina.parquet: no such file" in _error_line(capsys)
    assert run_cli(fixture_files, tmp_path / "o", "--rl-pool-size", "100", "--pool-subset-size", "90") == 2
    assert "--pool-subset-size" in _error_line(capsys)


def test_eval_sets_sharing_a_problem_is_one_line(fixture_files, tmp_path, capsys):
    """An OOD source that also holds an AIME problem: named in one line, nothing written."""
    mixed = tmp_path / "ood_with_aime.jsonl"
    aime_problem = "Find the sum of all positive divisors of 100."
    mixed.write_text(fixture_files["ood"].read_text()
                     + json.dumps({"problem": "Find the sum of all  positive divisors of 100.", "answer": "217"}) + "\n")
    out = tmp_path / "out"
    files = dict(fixture_files, ood=mixed)
    capsys.readouterr()
    assert run_cli(files, out, *SIZES) == 2
    line = _error_line(capsys)
    assert "probe_set_200_ood.jsonl" in line and "aime_eval.jsonl" in line and "1 problem" in line
    assert str(mixed) in line and "--aime-source" in line
    assert not out.exists() or not any(out.iterdir())
    assert dp.problem_hash(aime_problem) in {dp.problem_hash(p) for p, _ in dp.read_eval_rows(str(mixed))[1]}


def test_unwritable_out_dir_is_one_line(fixture_files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli(fixture_files, blocker / "data", *SIZES) == 2
    assert "--out-dir" in _error_line(capsys)


def test_report_ignores_display_options(fixture_files, tmp_path):
    assert run_cli(fixture_files, tmp_path, *SIZES) == 0
    first = (tmp_path / "prep_report.json").read_bytes()
    argv = ["--source", str(fixture_files["parquet"]), "--ood-source", str(fixture_files["ood"]),
            "--aime-source", str(fixture_files["aime"]), "--out-dir", str(tmp_path), *SIZES]
    assert prepare_sft_data.main(argv) == 0  # with progress bars this time
    assert (tmp_path / "prep_report.json").read_bytes() == first


def test_eval_source_none_skips_file_and_warns_on_stale(fixture_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    capsys.readouterr()
    argv = ["--source", str(fixture_files["parquet"]), "--ood-source", "none", "--aime-source", "none",
            "--out-dir", str(out), "--no-progress", *SIZES]
    assert prepare_sft_data.main(argv) == 0
    report = json.loads((out / "prep_report.json").read_text())
    assert set(report["outputs"]) == set(OUTPUTS) - set(EVAL)
    assert sorted(report["stale_files_not_written"]) == sorted(EVAL)
    assert "earlier run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The default hub path, with only the network boundary replaced
# ---------------------------------------------------------------------------------------------


def test_hub_source_path_matches_file_path(fixture_files, tmp_path, monkeypatch):
    import datasets
    from datasets.table import InMemoryTable

    calls = []

    def fake_load_dataset(name, split=None, revision=None, **kwargs):
        calls.append((name, split, revision))
        table = pq.read_table(fixture_files["parquet"])
        return datasets.Dataset(InMemoryTable(table))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert run_cli(fixture_files, tmp_path / "file", *SIZES) == 0
    argv = ["--ood-source", str(fixture_files["ood"]), "--aime-source", str(fixture_files["aime"]),
            "--out-dir", str(tmp_path / "hub"), "--no-progress", "--revision", "abc123", *SIZES]
    assert prepare_sft_data.main(argv) == 0
    assert calls == [("AI-MO/NuminaMath-1.5", "train", "abc123")]
    for name in OUTPUTS:
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "file" / name).read_bytes()
    report = json.loads((tmp_path / "hub" / "prep_report.json").read_text())
    assert report["source"]["kind"] == "hub" and report["source"]["hub"]["revision"] == "abc123"


def test_hub_eval_source_picks_split(fixture_files, tmp_path, monkeypatch):
    import datasets

    def fake_load_dataset(name, split=None, revision=None, **kwargs):
        rows = [json.loads(line) for line in fixture_files["ood"].read_text().splitlines()]
        ds = datasets.Dataset.from_list(rows)
        return ds if split else datasets.DatasetDict({"test": ds, "train": ds.select([0])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    es = dp.build_eval_set("ood", "HuggingFaceH4/MATH-500", "x.jsonl", "ood_probe", 8, 42)
    assert es.info.hub["split"] == "test" and len(es.rows) == 8


# ---------------------------------------------------------------------------------------------
# The command line as users run it
# ---------------------------------------------------------------------------------------------


def test_cli_help_lists_every_option():
    proc = subprocess.run([sys.executable, str(REPO / "prepare_sft_data.py"), "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0
    for flag in ("--source", "--revision", "--ood-source", "--aime-source", "--out-dir", "--seed", "--rl-pool-size",
                 "--sft-size", "--dev-size", "--pool-subset-size", "--probe-size", "--ood-size",
                 "--min-problem-chars", "--no-progress", "--check"):
        assert flag in proc.stdout


def test_cli_end_to_end_in_a_subprocess(fixture_files, tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "prepare_sft_data.py"), "--source", str(fixture_files["jsonl"]),
           "--ood-source", str(fixture_files["ood"]), "--aime-source", str(fixture_files["aime"]),
           "--out-dir", str(out), *SIZES]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not_in_eval_sets" in proc.stderr and "sft_rl_pool.jsonl: 200 rows" in proc.stderr
    assert {p.name for p in out.iterdir()} == set(OUTPUTS) | {"prep_report.json", "prep_timing.json",
                                                             "prep_funnel.png"}


@pytest.mark.slow
def test_benchmark_runs_small(tmp_path):
    """The benchmark script end to end on 3,000 rows (its figures are printed, never asserted)."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_prepare_data.py"), "--rows", "3000", "--repeat", "2",
           "--cache-dir", str(tmp_path), "--rl-pool-size", "300", "--sft-size", "50", "--dev-size", "10",
           "--pool-subset-size", "40", "--probe-size", "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical outputs across 2 runs: True" in proc.stdout
    assert "peak RSS" in proc.stdout and "dedup" in proc.stdout


def test_docstring_examples_hold():
    import doctest

    result = doctest.testmod(dp)
    assert result.attempted >= 15 and result.failed == 0


def test_parquet_and_jsonl_sources_give_the_same_files(fixture_files, tmp_path):
    """The JSONL fixture holds the parquet rows plus five malformed lines; both readers agree."""
    assert run_cli(fixture_files, tmp_path / "p", *SIZES, source="parquet") == 0
    assert run_cli(fixture_files, tmp_path / "j", *SIZES, source="jsonl") == 0
    for name in OUTPUTS:
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "j" / name).read_bytes(), name


@pytest.mark.parametrize("tamper", ["outputs_list", "report_list", "no_sha256", "outputs_emptied",
                                    "tampered_entry_dropped", "unknown_entry"])
def test_check_catches_a_tampered_report_in_one_line(fixture_files, tmp_path, capsys, tamper):
    out = tmp_path / "out"
    assert run_cli(fixture_files, out, *SIZES) == 0
    report_path = out / dp.OUT_REPORT
    report = json.loads(report_path.read_text())
    if tamper == "outputs_list":
        report["outputs"] = list(report["outputs"])
    elif tamper == "report_list":
        report = [report]
    elif tamper == "no_sha256":
        del report["outputs"][dp.OUT_POOL]["sha256"]
    elif tamper == "outputs_emptied":
        report["outputs"] = {}
    elif tamper == "tampered_entry_dropped":
        with open(out / dp.OUT_SFT_DEV, "a") as handle:
            handle.write('{"input": "x", "label": "1"}\n')
        del report["outputs"][dp.OUT_SFT_DEV]
    else:
        report["outputs"]["../../etc/passwd"] = {"sha256": "0" * 64}
    report_path.write_text(json.dumps(report))
    capsys.readouterr()
    assert prepare_sft_data.main(["--check", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    assert all(str(out) in line for line in err.strip().splitlines())


# ---------------------------------------------------------------------------------------------
# Eval sources: every dropped row is told, nothing shrinks quietly
# ---------------------------------------------------------------------------------------------

AIME_I_12 = ("Define $f(x)=|| x|-\\tfrac{1}{2}|$ and $g(x)=|| x|-\\tfrac{1}{4}|$. Find the number of intersections "
             "of the graphs of \\[y=4 g(f(\\sin (2 \\pi x))) \\quad\\text{ and }\\quad x=4 g(f(\\cos (3 \\pi y))).\\]")


def _eval_file(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_eval_source_in_rfts_own_row_format(tmp_path):
    src = _eval_file(tmp_path / "own.jsonl", [json.dumps({"input": f"Problem number {i} here?", "label": str(i)}).encode()
                                              for i in range(5)])
    es = dp.build_eval_set("ood", str(src), "x.jsonl", "ood_probe", 5, 42)
    assert sorted(r["label"] for r in es.rows) == ["0", "1", "2", "3", "4"]


def test_bad_eval_lines_and_answers_are_told_in_one_line_each(tmp_path, capsys):
    good = [json.dumps({"problem": f"Problem number {i} here?", "answer": str(i)}).encode() for i in range(3)]
    src = _eval_file(tmp_path / "ood.jsonl", good + [
        b'{"problem": "torn', b'\xff\xfe not utf-8',
        json.dumps({"problem": "Is it true or false, this one?", "answer": True}).encode(),
        json.dumps({"problem": "What has no answer at all here?", "answer": None}).encode(),
        json.dumps({"problem": "What is seven written as a float?", "answer": 7.0}).encode(),
    ])
    es = dp.build_eval_set("ood", str(src), "x.jsonl", "ood_probe", None, 42)
    assert sorted(r["label"] for r in es.rows) == ["0", "1", "2", "7"]
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if "skipped" in line]
    assert len(skipped) == 1 and str(src) in skipped[0]
    assert "not valid JSON (first: line 4)" in skipped[0] and "not UTF-8 (first: line 5)" in skipped[0]
    dropped = [line for line in err if "dropped" in line]
    assert len(dropped) == 1 and "4 of 8 row(s)" in dropped[0]
    assert "answer is true/false 1" in dropped[0] and "missing answer 1" in dropped[0]


def test_a_short_eval_source_is_refused_not_written_short(fixture_files, tmp_path, capsys):
    assert run_cli(fixture_files, tmp_path / "out", *SIZES[:-2], "--ood-size", "400") == 2
    line = _error_line(capsys)
    assert "--ood-size 400" in line and "only 8 usable" in line and "at most 8" in line
    assert not (tmp_path / "out" / dp.OUT_PROBE_OOD).exists()


def test_a_folder_without_eval_files_names_what_it_wants(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(dp.PrepError, match="problems with answers") as err:
        dp.build_eval_set("ood", str(tmp_path / "empty"), "x.jsonl", "ood_probe", None, 42)
    assert "NuminaMath" not in str(err.value)


def test_training_jsonl_of_another_schema_names_the_missing_columns(fixture_files, tmp_path, capsys):
    src = _eval_file(tmp_path / "wrong.jsonl", [json.dumps({"question": "q", "answer": "1"}).encode()] * 3)
    argv = ["--source", str(src), "--ood-source", "none", "--aime-source", "none", "--out-dir", str(tmp_path / "o")]
    assert prepare_sft_data.main(argv) == 2
    line = _error_line(capsys)
    assert str(src) in line and "problem" in line and "only 0 problems" not in line


def test_an_unreadable_source_is_one_line(fixture_files, tmp_path, monkeypatch, capsys):
    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dp, "file_sha256", denied)
    assert run_cli(fixture_files, tmp_path / "out", *SIZES) == 2
    line = _error_line(capsys)
    assert "cannot read it" in line and "Permission denied" in line


def test_eval_sets_can_be_pinned(fixture_files, monkeypatch, tmp_path):
    import datasets

    seen = {}

    def fake_load_dataset(name, split=None, revision=None, **kwargs):
        seen[name] = revision
        rows = [json.loads(line) for line in fixture_files["ood"].read_text().splitlines()]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    es = dp.build_eval_set("ood", "HuggingFaceH4/MATH-500", "x.jsonl", "ood_probe", 8, 42, revision="abc123")
    assert seen == {"HuggingFaceH4/MATH-500": "abc123"} and es.info.hub["revision"] == "abc123"
    with pytest.raises(dp.PrepError, match="revision pins a hub dataset"):
        dp.build_eval_set("ood", str(fixture_files["ood"]), "x.jsonl", "ood_probe", 8, 42, revision="abc123")
    args = prepare_sft_data.build_parser().parse_args(["--ood-revision", "r1", "--aime-revision", "r2"])
    assert (args.ood_revision, args.aime_revision) == ("r1", "r2")


def test_a_known_wrong_aime_answer_is_told(tmp_path, capsys):
    src = _eval_file(tmp_path / "aime.jsonl", [json.dumps({"problem": AIME_I_12, "answer": "384"}).encode()])
    dp.build_eval_set("aime", str(src), "x.jsonl", "aime", None, 42)
    err = capsys.readouterr().err
    assert "AIME 2024 I problem 12" in err and "385" in err and str(src) in err
    _eval_file(src, [json.dumps({"problem": AIME_I_12, "answer": "385"}).encode()])
    dp.build_eval_set("aime", str(src), "x.jsonl", "aime", None, 42)
    assert "known error" not in capsys.readouterr().err
