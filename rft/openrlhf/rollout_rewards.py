"""What one rollout's reward result becomes in ``experience.info`` (experience_maker.patch).

OpenRLHF 0.9.3 turns the reward function's answer into per-sample tensors in
``SamplesGenerator._process_response_into_experience`` (``trainer/ppo_utils/experience_maker.py``).
Three things there can stop a run, and these hooks make each cost one sample at most:

* ``utils/agent.py`` swallows a reward function that raised and leaves ``reward=None``;
  ``Experience.concat_experiences`` then cannot batch the sample. :func:`guard_rewards` turns a
  missing, non-finite or non-numeric reward or score into 0.0 and counts it.
* Every ``extra_logs`` value goes into ``torch.tensor([value])``: a string raises, and a key named
  like OpenRLHF's own (``reward``, ``response_length``) silently overwrites it. :func:`add_extra_logs`
  keeps one number per key and refuses the rest with one warning per key. The text logs of
  :data:`rft.contract.TEXT_LOG_KEYS` are kept as one-item lists, which ``concat_experiences``
  joins; the trainer takes them out before anything averages the info (:mod:`rft.openrlhf.run_log`).
* A key that only some samples log makes ``split_experience_batch`` raise ("Size of info[k] does
  not match batch_size"). :func:`align_info_keys` gives every sample the same keys.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import torch

from rft.contract import TEXT_LOG_KEYS

logger = logging.getLogger(__name__)

REWARD_FAILURES_KEY = "reward_failures"
"""Info key: 1.0 for a sample whose reward or score was unusable (its batch mean is the failure rate)."""

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` the first time it comes up in this process: one line per misbehaving key, not per sample."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def finite_reward(value: Any) -> Optional[float]:
    """A reward or score as a finite float; None when it is missing, not one number, NaN or infinite.

    >>> finite_reward(1), finite_reward(torch.tensor([0.5])), finite_reward(float("nan")), finite_reward("1")
    (1.0, 0.5, None, None)
    """
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def guard_rewards(reward: Any, score: Any, rewards_in_rollout: Any) -> tuple[Any, Any, Optional[bool]]:
    """``(reward, score, failed)`` to build the sample from.

    With rewards computed in the rollout (``rewards_in_rollout`` truthy: the ``--remote_rm_url`` list) an unusable reward becomes 0.0, a
    missing score takes the reward (as ``utils/agent.py`` does), an unusable one becomes 0.0, and
    ``failed`` says whether either was unusable. Without it a reward model scores the batch later,
    so None stays None and ``failed`` is None (nothing to count).

    >>> guard_rewards(None, None, True), guard_rewards(1.0, float("nan"), True), guard_rewards(None, None, False)
    ((0.0, 0.0, True), (1.0, 0.0, True), (None, None, None))
    """
    if not rewards_in_rollout:
        return reward, score, None
    good_reward, good_score = finite_reward(reward), finite_reward(score)
    failed = good_reward is None or (score is not None and good_score is None)
    reward = 0.0 if good_reward is None else good_reward
    if score is None:
        score = reward
    else:
        score = 0.0 if good_score is None else good_score
    return reward, score, failed


def numeric_log_value(key: str, value: Any) -> Optional[float]:
    """An ``extra_logs`` value as one float (bool, int, float, numpy scalar, a tensor's first element), else None.

    A tensor gives its first element, as 0.9.3 does; anything else (text, None, a list) gives None
    and one warning for the key.
    """
    if isinstance(value, torch.Tensor):
        value = value.flatten()[0].item() if value.numel() else None
    elif callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():  # a numpy scalar
        value = value.item()
    if isinstance(value, (bool, int, float)):
        return float(value)
    warn_once(f"extra_logs[{key!r}] is {type(value).__name__}, not a number; the key is not logged")
    return None


def text_log_value(value: Any) -> Optional[str]:
    """A text log's value: the text, or None for a missing answer (anything else is written as text)."""
    return None if value is None else str(value)


def add_extra_logs(info: dict, extra_logs: Optional[dict], failed: Optional[bool]) -> None:
    """Add a sample's reward failure flag and ``extra_logs`` to its ``info`` (one-sample tensors).

    A key that would overwrite OpenRLHF's own info is refused with one warning; text logs become
    a one-item list (never a tensor); other values one float or nothing.
    """
    if failed is not None:
        info[REWARD_FAILURES_KEY] = torch.tensor([float(failed)])
    for key, value in (extra_logs or {}).items():
        if key in info:
            warn_once(f"extra_logs key {key!r} would overwrite OpenRLHF's own value; not logged")
        elif key in TEXT_LOG_KEYS:
            info[key] = [text_log_value(value)]
        else:
            number = numeric_log_value(key, value)
            if number is not None:
                info[key] = torch.tensor([number])


def align_info_keys(experiences: Iterable[Any]) -> None:
    """Give every experience the same info keys: a key some samples lack is 0.0 there ([None] for text).

    A sample whose reward function raised has no extra_logs at all, so this is the common case
    of a single failure, not an exotic one.
    """
    experiences = list(experiences)
    keys = {key for e in experiences for key in e.info}
    for key in sorted(keys):
        missing = [e for e in experiences if key not in e.info]
        if not missing:
            continue
        if key not in TEXT_LOG_KEYS:
            warn_once(f"info key {key!r} is missing from some samples; they log 0.0 for it")
        for e in missing:
            e.info[key] = [None] if key in TEXT_LOG_KEYS else torch.tensor([0.0])
