"""prompt_spec.patch: OpenRLHF's prompt dataset renders through rft's prompt specification.

The dataset is the real ``PromptDataset`` of the pristine and the patched 0.9.3 trees; the
tokenizer is the quick start's (rft/tiny.py), whose template reads the date and the effort
the way gpt-oss's does. The clock is moved by replacing the ``datetime`` that transformers'
``strftime_now`` reads (fixtures ``tok`` and ``clock``, conftest.py).
"""

from __future__ import annotations

import datetime as dt
import types

import pytest

import oprl
import parser_util
from rft import prompt_spec as ps

PROBLEMS = [{"input": "Problem 1: what is the secret number?", "label": "7"},
            {"input": [{"role": "system", "content": "Box it."}, {"role": "user", "content": "Problem 2"}], "label": "3"}]
BASE_ARGV = ["--pretrain", "m", "--remote_rm_url", "reward_func_em.py", "--apply_chat_template",
             "--input_key", "input", "--label_key", "label"]


def _prompts(root, tok, argv, clock, day):
    clock.today = day
    args = parser_util.parse_train_args(root, BASE_ARGV + argv)
    strategy = types.SimpleNamespace(args=args, is_rank_0=lambda: True)
    dataset = oprl.load(root, "openrlhf.datasets.prompts_dataset").PromptDataset(PROBLEMS, tok, strategy)
    return [dataset[i][1] for i in range(len(dataset))]


MIDNIGHT = (dt.datetime(2026, 12, 6, 23, 59), dt.datetime(2026, 12, 7, 0, 0))


@pytest.mark.parametrize("tree", [
    pytest.param("pristine", marks=pytest.mark.xfail(strict=True, reason="0.9.3 writes today's date into the prompt")),
    "patched",
])
def test_training_prompts_do_not_change_at_midnight(tree, request, tok, clock):
    root = request.getfixturevalue(f"{tree}_root")
    before, after = (_prompts(root, tok, [], clock, day) for day in MIDNIGHT)
    assert before == after


def test_patched_prompts_are_the_specs_render(patched_root, tok, clock):
    prompts = _prompts(patched_root, tok, ["--reasoning_effort", "low", "--prompt_date", "2030-01-31"], clock,
                       MIDNIGHT[1])
    spec = ps.PromptSpec.for_tokenizer(tok, "low", "2030-01-31")
    assert prompts == [ps.render(tok, p["input"], spec) for p in PROBLEMS]
    assert "Reasoning: low<|end|>" in prompts[0] and "Current date: 2030-01-31\n" in prompts[0]


def test_default_settings_are_the_specs_defaults(patched_root):
    args = parser_util.parse_train_args(patched_root, BASE_ARGV)
    assert (args.reasoning_effort, args.prompt_date) == (ps.DEFAULT_EFFORT, ps.DEFAULT_DATE)


@pytest.mark.parametrize("argv", [["--reasoning_effort", "max"], ["--prompt_date", "2025-02-30"]])
def test_bad_settings_are_refused_by_the_parser(patched_root, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser_util.parse_train_args(patched_root, BASE_ARGV + argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_canary_pristine_dataset_uses_the_tokenizers_template(pristine_root):
    src = (pristine_root / "openrlhf/datasets/prompts_dataset.py").read_text()
    assert src.count("apply_chat_template = self.tokenizer.apply_chat_template") == 1


def test_training_and_eval_prompts_are_byte_identical_on_any_two_dates(patched_root, tok, clock):
    """A rollout's prompt (patched PromptDataset, one day) and eval_posthoc.py's (another day, default
    settings, the run's manifest values) are the same bytes."""
    import argparse

    import eval_posthoc

    trained = _prompts(patched_root, tok, [], clock, dt.datetime(2026, 12, 6, 12, 0))
    clock.today = dt.datetime(2027, 3, 14, 9, 30)  # a week or months later, on the spare node
    args = argparse.Namespace(reasoning_effort=None, prompt_date=None, max_tokens=None)
    manifest = {"openrlhf_args": vars(parser_util.parse_train_args(patched_root, BASE_ARGV))}
    for settings in (eval_posthoc.prompt_settings(args, None), eval_posthoc.prompt_settings(args, manifest)):
        spec = settings.spec(tok)
        assert [eval_posthoc.build_prompt(tok, p["input"], spec) for p in PROBLEMS] == trained
        assert settings.differs_from_run == ()
