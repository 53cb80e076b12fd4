"""The prompt specification: how a problem becomes the text gpt-oss sees, in training and in eval.

gpt-oss's chat template decides much of what the model does, and left to its defaults it
changes under a run: it writes ``Current date: <today>`` into the system message (so a
4-day run's prompts change at midnight, and a checkpoint scored a week later sees prompts it
never trained on) and picks a reasoning effort of its own. rft fixes both, once, here:

* **reasoning effort** (``low`` / ``medium`` / ``high``), default ``medium``: the template's
  own default, the effort the base model is usually measured at, and what the earlier runs
  trained with. It moves the score more than anything else (the model card's AIME 2024 for
  gpt-oss-20b without tools is 42.1 / 80.0 / 92.1 at low / medium / high, each with a budget
  far above 4,096 tokens), so every number rft prints names it.
* **date**: the ``Current date:`` line is pinned to :data:`DEFAULT_DATE` (gpt-oss's release
  date) instead of today's, so the same problem renders to the same bytes on any day.
* **system message**: a ``system`` turn in the data is passed to the template as it is; gpt-oss's
  template renders it as developer instructions (``# Instructions``) under its own system header.
* **template**: the tokenizer's own chat template, identified by its sha256.

The same :func:`render` is called by OpenRLHF's prompt dataset (through the
``prompt_spec.patch`` hook: training rollouts and the built-in eval) and by
``eval_posthoc.py``; :meth:`PromptSpec.digest` identifies the whole specification in the run
manifest and in every eval output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Mapping

EFFORTS = ("low", "medium", "high")
DEFAULT_EFFORT = "medium"
DEFAULT_DATE = "2025-08-05"
"""gpt-oss's release date: any fixed date keeps prompts stable; this one is plausible to the model."""
SYSTEM_HANDLING = "template"
"""A system turn is handed to the chat template unchanged (gpt-oss renders it as developer instructions)."""


class PromptSpecError(ValueError):
    """A setting of the prompt specification that cannot be used; the message names it and the fix."""


def template_sha256(template: str | None) -> str:
    """sha256 of a chat template's text; raises when the tokenizer has none."""
    if not template:
        raise PromptSpecError("the tokenizer has no chat template: rft renders prompts with the model's own "
                              "template; use the model's tokenizer (tokenizer_config.json or chat_template.jinja)")
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def check_effort(effort: str) -> str:
    if effort not in EFFORTS:
        raise PromptSpecError(f"REASONING_EFFORT={effort!r} is not one of {', '.join(EFFORTS)}")
    return effort


def check_date(date: str) -> str:
    try:
        datetime.strptime(date, "%Y-%m-%d")
    except (TypeError, ValueError):
        raise PromptSpecError(f"PROMPT_DATE={date!r} is not a date written YYYY-MM-DD (e.g. {DEFAULT_DATE})") from None
    return date


@dataclass(frozen=True)
class PromptSpec:
    """Everything besides the problem that decides the prompt's bytes."""

    template_sha256: str
    reasoning_effort: str = DEFAULT_EFFORT
    date: str = DEFAULT_DATE
    system: str = SYSTEM_HANDLING

    def __post_init__(self) -> None:
        check_effort(self.reasoning_effort)
        check_date(self.date)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, reasoning_effort: str = DEFAULT_EFFORT, date: str = DEFAULT_DATE) -> "PromptSpec":
        return cls(template_sha256(getattr(tokenizer, "chat_template", None)), reasoning_effort, date)

    def as_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest()}

    def digest(self) -> str:
        """First 16 hex digits of the sha256 of the specification's canonical JSON."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        """One label for reports: ``effort=medium date=2025-08-05 spec=<digest>``."""
        return f"effort={self.reasoning_effort} date={self.date} spec={self.digest()}"


def as_chat(problem: Any) -> list[Mapping[str, Any]]:
    """A problem as chat turns: a string becomes one user turn (as OpenRLHF does); a list is kept."""
    if isinstance(problem, str):
        return [{"role": "user", "content": problem}]
    if isinstance(problem, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in problem):
        return problem
    raise PromptSpecError(f"a prompt must be a string or a list of {{role, content}} turns, got {type(problem).__name__}")


def template_kwargs(spec: PromptSpec) -> dict:
    """What the chat template is rendered with besides the messages.

    ``strftime_now`` is a global that transformers gives every template; a render argument of
    the same name takes its place, so the template's date line prints the pinned date.
    """
    pinned = datetime.strptime(spec.date, "%Y-%m-%d")
    return {"reasoning_effort": spec.reasoning_effort, "strftime_now": pinned.strftime}


def render(tokenizer: Any, problem: Any, spec: PromptSpec) -> str:
    """The prompt text for one problem, ending with the assistant header (generation prompt)."""
    actual = template_sha256(getattr(tokenizer, "chat_template", None))
    if actual != spec.template_sha256:
        raise PromptSpecError(f"the tokenizer's chat template (sha256 {actual[:12]}) is not the one the prompt spec "
                              f"names ({spec.template_sha256[:12]}): evaluate with the run's tokenizer")
    return tokenizer.apply_chat_template(as_chat(problem), tokenize=False, add_generation_prompt=True,
                                         **template_kwargs(spec))


def model_chat_template(model_dir: str) -> str | None:
    """The chat template a model folder ships (``chat_template.jinja``, else ``tokenizer_config.json``).

    None when the folder has none or is not a local folder (a hub id is resolved by transformers at
    run time; the run's own tokenizer then decides, and the eval checks it against the manifest).
    """
    import os

    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as handle:
            return handle.read()
    config = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as handle:
        template = json.load(handle).get("chat_template")
    if isinstance(template, list):  # named templates: the default one is what apply_chat_template uses
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def manifest_record(model_dir: str, reasoning_effort: str, date: str) -> dict:
    """The prompt spec as the run manifest records it, from the model folder the run loads."""
    try:
        template = model_chat_template(model_dir)
    except (OSError, ValueError) as exc:
        return {"reasoning_effort": reasoning_effort, "date": date, "error": f"{model_dir}: {exc}"}
    if template is None:
        return {"reasoning_effort": reasoning_effort, "date": date,
                "error": f"{model_dir}: no chat template found in the folder"}
    return PromptSpec(template_sha256(template), reasoning_effort, date).as_dict()
