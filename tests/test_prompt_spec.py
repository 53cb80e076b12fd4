"""The prompt specification renders the same bytes on any day, at the effort it names.

The tokenizer is the quick start's character tokenizer (rft/tiny.py), whose chat template has
gpt-oss's moving parts: ``strftime_now`` for the date line, ``reasoning_effort`` defaulting to
medium, a system turn rendered as developer instructions (fixtures ``tok`` and ``clock``, conftest.py).
"""

import datetime as dt

import pytest

from rft import prompt_spec as ps


def _default_render(tok, problem):
    return tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)


def test_template_defaults_move_with_the_clock(tok, clock):
    """Why the spec exists: left to its defaults, the prompt of one problem changes at midnight."""
    clock.today = dt.datetime(2026, 12, 6, 23, 59)
    before = _default_render(tok, "Problem 1")
    clock.today = dt.datetime(2026, 12, 7, 0, 0)
    after = _default_render(tok, "Problem 1")
    assert before != after
    assert "Current date: 2026-12-07" in after and "Reasoning: medium" in after


def test_spec_render_is_byte_identical_on_any_two_dates(tok, clock):
    spec = ps.PromptSpec.for_tokenizer(tok)
    renders = set()
    for day in (dt.datetime(2026, 12, 6, 23, 59), dt.datetime(2026, 12, 7, 0, 0), dt.datetime(2031, 2, 28)):
        clock.today = day
        renders.add(ps.render(tok, "Problem 1", spec))
    assert len(renders) == 1
    (text,) = renders
    assert f"Current date: {ps.DEFAULT_DATE}\n" in text
    assert text.endswith("<|start|>user<|message|>Problem 1<|end|><|start|>assistant")


@pytest.mark.parametrize("effort", ps.EFFORTS)
def test_effort_reaches_the_prompt(tok, effort):
    text = ps.render(tok, "Problem 1", ps.PromptSpec.for_tokenizer(tok, effort))
    assert f"Reasoning: {effort}<|end|>" in text


def test_pinned_date_is_the_one_named(tok):
    text = ps.render(tok, "p", ps.PromptSpec.for_tokenizer(tok, date="2030-01-31"))
    assert "Current date: 2030-01-31\n" in text


def test_system_turn_becomes_developer_instructions(tok):
    chat = [{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": "Problem 2"}]
    text = ps.render(tok, chat, ps.PromptSpec.for_tokenizer(tok))
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in a box.<|end|><|start|>user" in text


def test_string_problem_is_one_user_turn_as_openrlhf_makes_it(tok):
    spec = ps.PromptSpec.for_tokenizer(tok)
    assert ps.render(tok, "Problem 3", spec) == ps.render(tok, [{"role": "user", "content": "Problem 3"}], spec)


def test_digest_names_every_field(tok):
    base = ps.PromptSpec.for_tokenizer(tok)
    variants = {base.digest(), ps.PromptSpec.for_tokenizer(tok, "low").digest(),
                ps.PromptSpec.for_tokenizer(tok, date="2025-08-06").digest(),
                ps.PromptSpec("0" * 64).digest()}
    assert len(variants) == 4
    assert base.as_dict()["digest"] == base.digest() and len(base.digest()) == 16


def test_another_template_is_refused(tok):
    spec = ps.PromptSpec("0" * 64)
    with pytest.raises(ps.PromptSpecError, match="not the one the prompt spec names"):
        ps.render(tok, "p", spec)


@pytest.mark.parametrize("bad", [dict(reasoning_effort="max"), dict(date="2025-13-01"), dict(date="today")])
def test_bad_settings_name_the_setting(bad):
    with pytest.raises(ps.PromptSpecError, match="REASONING_EFFORT|PROMPT_DATE"):
        ps.PromptSpec("0" * 64, **bad)


def test_no_template_is_refused():
    with pytest.raises(ps.PromptSpecError, match="no chat template"):
        ps.template_sha256(None)
