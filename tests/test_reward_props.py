"""Property and adversarial tests of reward_func_em: any input gives a well-formed 0/1 reward.

The hypothesis tests draw arbitrary text and text assembled from the fragments
the parser reacts to (Harmony tokens, box macros, braces, digits, commas). The
adversarial cases are inputs that make careless graders raise, hang or
backtrack; they must give reward 0.0 with no answer. Timings are measured by
bench/bench_reward.py, not asserted here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reward_func_em as rf

RESULT_KEYS = {"reward", *rf.EXTRA_LOG_KEYS}
BINARY_KEYS = set(rf.EXTRA_LOG_KEYS) - {"parse_method"}

FRAGMENTS = [
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "$", "\\(", "\\)", "\\text{", " cm}",
    "<|channel|>", "final", "analysis", "<|message|>", "<|end|>", "<|return|>", "<|start|>assistant",
    "assistantfinal", "<|call|>", "<|constrain|>", "0", "7", "42", "1,", ",000", "{,}", "\\,", ".", "-",
    "\u2212", "=", "x", " ", "\n", "^\\circ", "\\%", "\x00", "\\dfrac", "é",
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)
any_text = st.one_of(st.text(max_size=300), fragment_text)
labels = st.one_of(st.integers(-10**6, 10**6), st.integers(0, 10**30).map(str), st.text(max_size=12), st.none())
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_result(out: dict) -> None:
    """The invariants every score_response result must satisfy."""
    assert set(out) == RESULT_KEYS
    for key, value in out.items():
        assert type(value) is float and math.isfinite(value), key
    assert out["reward"] in (0.0, 1.0)
    assert out["correctness"] == out["reward"]
    for key in BINARY_KEYS:
        assert out[key] in (0.0, 1.0), key
    assert out["parse_method"] in (0.0, 1.0, 2.0)
    assert (out["has_answer"] == 1.0) == (out["parse_method"] > 0)
    if out["reward"] == 1.0:
        assert out["has_answer"] == 1.0 and out["reward_error"] == 0.0


@PROPS
@given(response=any_text, label=labels)
def test_any_text_gives_a_well_formed_result(response, label):
    check_result(rf.score_response(response, label))


@PROPS
@given(prompt=any_text, response=any_text, label=labels)
def test_reward_func_matches_score_response(prompt, response, label):
    out = rf.reward_func([prompt + response], [prompt], [label])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert tuple(out["extra_logs"]) == rf.EXTRA_LOG_KEYS + rf.TEXT_LOG_KEYS
    expected, answer = rf.score_with_answer(rf.strip_prompt(prompt + response, prompt), label)
    assert out["rewards"] == out["scores"] == expected["reward"]
    assert out["extra_logs"] == {**{k: expected[k] for k in rf.EXTRA_LOG_KEYS}, "extracted_answer": answer}
    check_result({"reward": out["rewards"], **{k: out["extra_logs"][k] for k in rf.EXTRA_LOG_KEYS}})


@PROPS
@given(text=any_text)
def test_helpers_never_raise(text):
    assert isinstance(rf.strip_prompt(text, text[: len(text) // 2]), str)
    assert isinstance(rf.extract_final_text(text), str)
    answer, method = rf.extract_answer(text)
    assert (answer is None) == (method == 0) and method in (0, 1, 2)
    assert isinstance(rf.normalize_answer(text), str)
    assert rf.answers_match(text, text) in (True, False)


@PROPS
@given(
    prefix=st.text(alphabet=st.characters(blacklist_characters="<\\{}"), max_size=200).filter(lambda t: "assistant" not in t),
    n=st.integers(-10**40, 10**40),
)
def test_a_final_box_with_the_label_is_always_correct(prefix, n):
    # Whatever prose comes first, a closing \boxed{n} answers label n; n + 1 is never accepted.
    # (Prose holding "assistantcommentary" reads as stripped Harmony markup without a final message.)
    response = "Solution: " + prefix + f" so the answer is $\\boxed{{{n}}}$."
    assert rf.score_response(response, str(n))["reward"] == 1.0
    assert rf.score_response(response, str(n + 1))["reward"] == 0.0


@PROPS
@given(n=st.integers(-10**12, 10**12), zeros=st.integers(0, 3), wrap=st.sampled_from(["{}", "${}$", "\\text{{{}}}", "\\({}\\)", "{}.", "x = {}", "{}^\\circ", "{}\\text{{ cm}}"]))
def test_integer_spellings_match(n, zeros, wrap):
    # Thousands commas ({,} too), leading zeros, unicode minus and wrappers all spell the same integer.
    digits = f"{abs(n):,}".replace(",", "{,}" if zeros % 2 else ",")
    digits = "0" * zeros + digits if "," not in digits and "{" not in digits else digits
    spelled = ("\u2212" if n < 0 else "") + digits
    assert rf.answers_match(wrap.format(spelled), str(n))
    assert not rf.answers_match(wrap.format(spelled), str(n + 1))


ADVERSARIAL = [
    ("none", None),
    ("bytes", b"\\boxed{1}"),
    ("int", 1),
    ("one-megabyte-of-open-braces", "{" * 1_000_000),
    ("nested-boxed-100k", "\\boxed{" * 100_000),
    ("comma-bait", "1," * 50_000),
    ("nul-bytes", "\x00" * 1_000_000),
    ("nul-around-box", "\x00\\boxed{\x00}\x00"),
    ("final-headers-100k", "<|channel|>final" * 100_000),
    ("unterminated-special-tokens", "<|channel|>final<|message|>" + "<|" * 300_000),
    ("box-of-balanced-pairs", "\\boxed{" + "{}" * 500_000),
    ("boxed-macros-without-arguments", "\\boxed\\fbox" * 100_000),
    ("open-math-delimiters", "$\\(" * 20_000),
    ("million-digit-run-with-commas", ("123," * 250_000) + "x"),
    ("deep-text-wrappers-unclosed", "\\text{" * 100_000),
    ("assistantfinal-then-garbage", "assistantfinal" + "{" * 500_000),
    ("token-closers-500k", "<|channel|>final<|message|>" + "|>" * 500_000),
    ("empty-tokens-250k", "<|channel|>final<|message|>" + "<||>" * 250_000),
    ("one-megabyte-of-letters", "a" * 1_000_000),
]


@PROPS
@given(parts=st.lists(st.sampled_from(["<|", "|>", "|", "<", ">", "a", "end", "_", "<|end|>", "<|return|>", " "]), max_size=40), data=st.data())
def test_first_special_token_equals_a_plain_regex_search(parts, data):
    # The fast token finder must agree with the obvious (slower) leftmost regex search.
    text = "".join(parts)
    start = data.draw(st.integers(0, len(text)))
    m = rf._SPECIAL_TOKEN_RE.search(text, start)
    assert rf._first_special_token(text, start) == (m.start() if m else len(text))


@pytest.mark.parametrize(("why", "response"), ADVERSARIAL, ids=[c[0] for c in ADVERSARIAL])
def test_adversarial_inputs_give_no_answer(why, response):
    # Label "1" is what most of these inputs would falsely yield to a careless grader.
    out = rf.score_response(response, "1")
    check_result(out)
    assert (out["reward"], out["has_answer"]) == (0.0, 0.0), why
    via_func = rf.reward_func([response], [""], ["1"])
    assert (via_func["rewards"], via_func["extra_logs"]["has_answer"]) == (0.0, 0.0)


@pytest.mark.parametrize(("why", "label"), [("huge-label", "1" * 1_000_000), ("brace-label", "{" * 100_000), ("bytes-label", b"1")])
def test_adversarial_labels(why, label):
    out = rf.score_response("\\boxed{1}", label)
    check_result(out)
    assert (out["reward"], out["reward_error"]) == (0.0, 1.0), why


def test_odd_call_shapes():
    # OpenRLHF passes lists of length 1; anything else must still give rewards, never an exception.
    assert rf.reward_func(None, None, None)["rewards"] == 0.0
    assert rf.reward_func("\\boxed{3}", "", "3")["rewards"] == 1.0  # bare strings count as one sample
    out = rf.reward_func(["\\boxed{3}", "\\boxed{4}", "x"], [""], ["3", "4"])  # short prompt and label lists
    assert out["rewards"] == [1.0, 1.0, 0.0] and out["scores"] == out["rewards"]
    assert all(len(v) == 3 for v in out["extra_logs"].values())
    assert out["extra_logs"]["reward_error"] == [0.0, 0.0, 1.0]
    empty = rf.reward_func([], [], [])
    assert empty["rewards"] == [] and all(v == [] for v in empty["extra_logs"].values())


HANG_GUARD_S = 120
"""Ceiling for scoring every adversarial input in a child process; they take well under a second.

Not a timing assertion: a parser that went quadratic on these megabyte inputs would run for
many minutes, and this turns that hang into a failure instead of a stuck CI job."""


def test_adversarial_inputs_finish_in_a_child_process():
    repo = Path(rf.__file__).resolve().parent
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "import reward_func_em as rf, test_reward_props as t\n"
        "out = [rf.reward_func([r], [''], ['1'])['extra_logs']['has_answer'] for _, r in t.ADVERSARIAL]\n"
        "print(len(out), sum(out))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True,
                              timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scoring the adversarial inputs did not finish in {HANG_GUARD_S} s: the parser hangs")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(len(ADVERSARIAL)), "0.0"]
