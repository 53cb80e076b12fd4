"""OpenRLHF's prompt dataset renders through rft's prompt specification (``prompt_spec.patch``).

Training rollouts and the built-in eval both build prompts in ``PromptDataset``; with this hook
they call :func:`rft.prompt_spec.render` with the run's ``--reasoning_effort`` and
``--prompt_date``, as ``eval_posthoc.py`` does for the same problem.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from rft.prompt_spec import DEFAULT_DATE, DEFAULT_EFFORT, EFFORTS, PromptSpec, PromptSpecError, check_date, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt spec's two settings on OpenRLHF's command line."""
    parser.add_argument("--reasoning_effort", choices=EFFORTS, default=DEFAULT_EFFORT,
                        help="gpt-oss reasoning effort written into every prompt (rft/prompt_spec.py)")
    parser.add_argument("--prompt_date", type=_date, default=DEFAULT_DATE,
                        help="the chat template's 'Current date' line, fixed for the whole run (YYYY-MM-DD)")


def _date(value: str) -> str:
    try:
        return check_date(value)
    except PromptSpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def spec_from_args(tokenizer: Any, args: Any) -> PromptSpec:
    """The run's prompt spec; a namespace without the settings (batch inference) gets the defaults."""
    return PromptSpec.for_tokenizer(tokenizer, getattr(args, "reasoning_effort", DEFAULT_EFFORT),
                                    getattr(args, "prompt_date", DEFAULT_DATE))


def chat_template_fn(tokenizer: Any, args: Any) -> Callable[..., str]:
    """A stand-in for ``tokenizer.apply_chat_template`` as ``PromptDataset`` calls it."""
    spec = spec_from_args(tokenizer, args)

    def apply(chat: Any, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        if tokenize or not add_generation_prompt:
            raise ValueError("rft's prompt hook renders generation prompts as text only")
        return render(tokenizer, chat, spec)

    return apply
