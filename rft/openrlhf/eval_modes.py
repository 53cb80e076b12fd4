"""Eval metrics grouped by the samples really generated, labelled with their mode (eval_grouping.patch).

OpenRLHF 0.9.3's ``PPOTrainer.evaluate`` (``trainer/ppo_trainer.py``) asks for
``eval_n_samples_per_prompt`` samples, but ``SamplesGenerator._dispatch_prompts_to_vllm``
generates ``n_samples_per_prompt`` (the training count) and the rewards are then cut into groups
of the eval count. Greedy eval with one sample during eight-sample training thus reads every
sample as its own prompt. The patch makes generation honour the count it is given, and
:func:`eval_logs` groups by that count, checking that each group really is one prompt.

Every metric names its mode, because a pass@1 means something different in each:

* ``greedy``: temperature 0, one sample;
* ``nondet_proxy``: temperature 0, several samples (they differ only by engine nondeterminism);
* ``sampling``: temperature above 0.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from rft.openrlhf.stats import pass_rates

logger = logging.getLogger(__name__)

CORRECT_THRESHOLD = 0.5
"""A ``correctness`` log (or, without one, a reward) above this counts the sample as correct."""

DEFAULT_DATASOURCE = "default"
"""OpenRLHF's datasource of an eval row that names none (``datasets/prompts_dataset.py``)."""

Group = tuple[str, list[Optional[float]], list[Optional[float]]]
"""One eval prompt: its text, each sample's correctness and each sample's reward."""


def eval_mode(temperature: float, n_samples: int) -> str:
    """Label of an eval setting.

    >>> eval_mode(0.0, 1), eval_mode(0.0, 8), eval_mode(0.6, 8)
    ('greedy', 'nondet_proxy', 'sampling')
    """
    if temperature <= 0:
        return "greedy" if n_samples == 1 else "nondet_proxy"
    return "sampling"


def info_value(experience: Any, key: str, i: int) -> Optional[float]:
    """``experience.info[key][i]`` as a float; None when absent or not a number."""
    info = getattr(experience, "info", None)
    value = info.get(key) if isinstance(info, dict) else None
    if value is None:
        return None
    try:
        return float(value[i])
    except (TypeError, ValueError, IndexError):
        return None


def group_eval_samples(samples_list: Sequence[Any], n_samples: int) -> list[Group]:
    """(prompt, correct values, rewards) per eval prompt.

    Generation returns each prompt's ``n_samples`` outputs one after another. A sample counts as
    correct by the reward's ``correctness`` log when present, else by its reward. When the
    samples do not form such groups (chunks mixing prompts, or a count that is not a multiple of
    n) they are grouped by prompt text instead, with a warning.
    """
    flat = []
    for samples in samples_list:
        for i, prompt in enumerate(samples.prompts):
            reward = info_value(samples, "reward", i)
            if reward is None and samples.rewards is not None:
                reward = float(samples.rewards[i])
            correct = info_value(samples, "correctness", i)
            flat.append((prompt, reward if correct is None else correct, reward))
    chunks = [flat[i : i + n_samples] for i in range(0, len(flat), n_samples)]
    if len(flat) % n_samples == 0 and all(len({c[0] for c in chunk}) == 1 for chunk in chunks):
        return [(c[0][0], [x[1] for x in c], [x[2] for x in c]) for c in chunks]
    logger.warning(f"eval: {len(flat)} samples do not form contiguous groups of {n_samples}; grouping by prompt")
    groups: dict[str, tuple[list, list]] = {}
    for prompt, correct, reward in flat:
        groups.setdefault(prompt, ([], []))
        groups[prompt][0].append(correct)
        groups[prompt][1].append(reward)
    return [(p, c, r) for p, (c, r) in groups.items()]


def eval_metrics(
    groups: Sequence[Group], prompt_to_datasource: Mapping[str, str], temperature: float, n_samples: int
) -> dict[str, float]:
    """``{source}/{mode}_pass@1``, ``{source}/{mode}_pass@{n}`` (n > 1), reward mean and prompt count per datasource."""
    mode = eval_mode(temperature, n_samples)
    per_source: dict[str, list] = {}
    for prompt, correct, rewards in groups:
        per_source.setdefault(prompt_to_datasource.get(prompt, DEFAULT_DATASOURCE), []).append((correct, rewards))
    logs = {}
    for source, rows in sorted(per_source.items()):
        hits = [[(c or 0.0) > CORRECT_THRESHOLD for c in correct] for correct, _ in rows]
        pass_at_1, pass_at_n = pass_rates(hits)
        rewards = [r for _, rs in rows for r in rs if r is not None]
        logs[f"{source}/{mode}_pass@1"] = pass_at_1
        if n_samples > 1:
            logs[f"{source}/{mode}_pass@{n_samples}"] = pass_at_n
        logs[f"{source}/reward_mean"] = sum(rewards) / len(rewards) if rewards else float("nan")
        logs[f"{source}/prompts"] = float(len(rows))
    return logs


def eval_logs(samples_list: Sequence[Any], prompt_to_datasource: Mapping[str, str], generate_kwargs: Mapping) -> dict:
    """What ``evaluate`` logs: :func:`eval_metrics` of the samples, with the temperature and count used."""
    n_samples = int(generate_kwargs["n_samples_per_prompt"])
    temperature = float(generate_kwargs.get("temperature", 1.0))
    logs = eval_metrics(group_eval_samples(samples_list, n_samples), prompt_to_datasource, temperature, n_samples)
    logs["temperature"] = temperature
    logs["n_samples_per_prompt"] = float(n_samples)
    return logs
