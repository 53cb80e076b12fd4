"""Exact-match reward for integer-answer math problems, for OpenRLHF 0.9.3 and gpt-oss.

OpenRLHF loads this file with ``--remote_rm_url reward_func_em.py`` and calls
``reward_func(queries, prompts, labels)`` once per sample, in a worker thread,
where ``queries[0]`` is the prompt followed by the response decoded with the
special tokens kept. The reward is 1.0 when the response's final answer equals
the label and 0.0 otherwise.

What is scored
    Only the response: the prompt is cut off first (the query starts with it;
    otherwise the text after the prompt's tail, otherwise the text after the
    last assistant turn marker), so a ``\\boxed{}`` in the problem never counts.
    Of a gpt-oss Harmony response only the final-channel message counts, in any
    of three spellings:

    * special tokens kept: ``<|channel|>analysis<|message|>...<|end|>``
      ``<|start|>assistant<|channel|>final<|message|>...<|return|>``;
    * special tokens stripped: ``analysis...assistantfinal...``;
    * plain text with no markup (the whole text is the answer message).

    A Harmony response without a final message (cut off while thinking, or
    ending in a tool call) has no answer: an answer in the analysis channel
    never counts.

Which answer
    The last ``\\boxed{...}`` (nested braces, ``\\boxed 42`` and ``\\fbox{...}``
    too); when there is none, the last number-like token; when the last box
    is not closed (cut off), the last number-like token inside that box.
    A number-like token whose commas are not thousands groups (``12,15``) is
    a list, not a number, and gives no answer.

Accepted answer forms (both answer and label are normalized the same way)
    ``$...$``, ``\\(...\\)``, ``\\[...\\]``; a trailing period; ``\\text{}``,
    ``\\textbf{}``, ``\\mathrm{}``, ``\\mathbf{}`` and ``\\boxed{}`` wrappers;
    ``\\dfrac``/``\\tfrac``; whitespace; thousands commas (``1,000``,
    ``1{,}000``, ``1\\,000``); leading zeros; the unicode minus; ``^\\circ``
    and ``°``; ``\\%``; ``\\$``; a trailing unit (``15\\text{ cm}``,
    ``15 cm``); ``x = 5``.

How answers compare
    Integers exactly, as digit strings (so 100001 != 100000 and
    2**53 + 1 != 2**53); decimals within a tolerance of 1e-6 (relative above 1);
    an integer never equals a non-integer (``12.5`` != 12, ``12.0`` == 12);
    a numeric label needs a numeric answer (``\\frac{84}{2}`` != 42,
    ``2^{10}`` != 1024); other answers by normalized string. An empty answer
    or an empty label is never correct.

Safety
    Standard library only, so OpenRLHF can load the file by path inside a Ray
    worker. Parsing is linear in the input (``str.find``/``rfind`` and bounded
    scans, no backtracking-prone regular expressions, no ``eval``, no sympy).
    Nothing raises: any input, ``None`` and bytes included, yields a reward.
    Errors are counted (``reward_error`` in the logs, :func:`reward_stats`).
    Every ``DEBUG_EVERY``-th call prints one line describing that sample.

>>> score_response("<|channel|>final<|message|>So $\\\\boxed{1{,}024}$.<|return|>", "1024")["reward"]
1.0
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import threading
from decimal import Decimal, InvalidOperation

__all__ = [
    "EXTRA_LOG_KEYS",
    "TEXT_LOG_KEYS",
    "answers_match",
    "extract_answer",
    "extract_final_text",
    "normalize_answer",
    "reward_func",
    "reward_stats",
    "score_response",
    "score_with_answer",
    "strip_prompt",
]

# --- Reward values -----------------------------------------------------------------------
REWARD_CORRECT = 1.0
REWARD_WRONG = 0.0

NUMERIC_TOLERANCE = 1e-6
"""Two decimals match when ``|a - b| <= NUMERIC_TOLERANCE * max(1, |label|)``."""

BOXED_IN_FINAL_FRACTION = 0.2
"""``boxed_in_final`` is 1.0 when the answer box starts in the last 20% of the response."""

# --- Bounds that keep every input's cost linear ----------------------------------------
MAX_BOXED_CHARS = 4096
"""A ``\\boxed{`` whose brace does not close within this many characters counts as unclosed."""
MAX_BOX_CANDIDATES = 32
"""At most this many ``\\boxed`` occurrences not followed by an argument are skipped backwards."""
MAX_FINAL_CANDIDATES = 8
"""At most this many malformed ``<|channel|>final`` headers are skipped backwards."""
MAX_HEADER_CHARS = 128
"""Longest Harmony header text between ``<|channel|>final`` and ``<|message|>``."""
MAX_NUMBER_CHARS = 128
"""A last-number token longer than this (e.g. ``1,1,1,...``) is not an answer."""
MAX_ANSWER_CHARS = MAX_BOXED_CHARS
"""Answers and labels longer than this normalize to the empty string (never correct)."""
MAX_NORMALIZE_PASSES = 8
"""Wrapper-removal passes of :func:`normalize_answer` (``$\\text{\\boxed{5}}$`` needs three)."""
PROMPT_TAIL_CHARS = 256
"""When the query does not start with the prompt, the prompt's last characters are searched."""
LONG_RESPONSE_CHARS = 8000
"""Truncation heuristic for text without Harmony tokens: this long and no box."""

DEBUG_EVERY = 1000
"""Print one sample every this many ``reward_func`` calls (env ``RFT_REWARD_DEBUG_EVERY``; 0 = never)."""
try:
    DEBUG_EVERY = int(os.environ.get("RFT_REWARD_DEBUG_EVERY", str(DEBUG_EVERY)))
except ValueError:
    pass

# --- Harmony (gpt-oss) markup -----------------------------------------------------------
CHANNEL_TOKEN = "<|channel|>"
MESSAGE_TOKEN = "<|message|>"
FINAL_HEADER = CHANNEL_TOKEN + "final"
STRIPPED_FINAL_HEADER = "assistantfinal"
"""What ``<|start|>assistant<|channel|>final<|message|>`` decodes to without special tokens."""
STRIPPED_NONFINAL_HEADERS = ("assistantanalysis", "assistantcommentary")
STRIPPED_NONFINAL_STARTS = ("analysis", "commentary")
STOP_TOKENS = ("<|return|>", "<|end|>", "<|call|>", "<|endoftext|>")
HEADER_BREAKERS = ("<|start|>", "<|end|>", "<|return|>", "<|call|>", CHANNEL_TOKEN)
ASSISTANT_MARKERS = (
    "<|start|>assistant",  # Harmony (gpt-oss)
    "<|im_start|>assistant",  # ChatML (Qwen)
    "<|start_header_id|>assistant<|end_header_id|>",  # Llama 3
    "<|assistant|>",
    "[/INST]",
)
"""Assistant turn markers, for queries that do not contain the prompt verbatim."""

BOX_MACROS = ("\\boxed", "\\fbox")
WRAPPER_MACROS = frozenset(
    ("boxed", "fbox", "text", "textbf", "textrm", "textit", "mathrm", "mathbf", "mathit", "mbox", "displaystyle")
)
UNIT_MACROS = ("\\text", "\\textrm", "\\mathrm", "\\mbox")

PARSE_BOXED = 2
PARSE_LAST_NUMBER = 1
PARSE_NONE = 0
PARSE_METHOD_CODES = {"boxed": float(PARSE_BOXED), "last_number": float(PARSE_LAST_NUMBER), "none": float(PARSE_NONE)}
"""Codes of the ``parse_method`` log: where the scored answer came from."""

EXTRA_LOG_KEYS = (
    "correctness",  # 1.0 when the answer matches the label (equals the reward)
    "has_answer",  # 1.0 when an answer was extracted and is not empty after normalization
    "has_boxed",  # 1.0 when the scored text holds a complete \boxed{...} / \fbox{...}
    "parse_method",  # 2.0 boxed, 1.0 last number, 0.0 no answer
    "boxed_in_final",  # 1.0 when the answer box starts in the last 20% of the response
    "truncated_response",  # 1.0 when the response looks cut off (heuristic, see _looks_truncated)
    "has_final_channel",  # 1.0 when a Harmony final-channel message was found
    "reward_error",  # 1.0 when the sample could not be scored properly (bad input type, empty label, internal error)
)
"""The ``extra_logs`` keys, identical for every sample and distinct from OpenRLHF's own info keys."""

TEXT_LOG_KEYS = ("extracted_answer",)
"""``extra_logs`` keys whose value is text (or None): the answer the reward compared, as extracted.

They leave the reward once, beside the numbers, so the trainer's samples log shows what was
scored without parsing the response again. They are never averaged: rft's patched experience
maker carries them outside the numeric logs (OpenRLHF 0.9.3 itself accepts numbers only)."""

_DIGITS = "0123456789"
_LEADING_SPACE_RE = re.compile(r"\s*")
_SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]{1,64}\|>")
_BRACE_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_SPACE_BOX_ARG_RE = re.compile(r"[^\s${}\\]{1,64}")
_NUMBER_TOKEN_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")
_NUMBER_RE = re.compile(r"([+-]?) ?(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d*))?")
_MACRO_START_RE = re.compile(r"\\([A-Za-z]+) ?")
_THIN_SPACE_THOUSANDS_RE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_SPACING_RE = re.compile(r"\\[,;:! ]|~")
_DEGREE_RE = re.compile(r"\^ ?\{ ?\\circ ?\}|\^ ?\\circ|\\circ|\^ ?\{ ?\\degree ?\}|\^ ?\\degree|\\degree")
_IDENTIFIER_RE = re.compile(
    r"\\?[A-Za-z]{1,16}(?:_\{?[A-Za-z0-9]{1,8}\}?)?(?:\( ?[A-Za-z0-9]{1,8} ?\))?"
)
_UNIT_WORD_RE = re.compile(r"[A-Za-z]{1,24}(?:\^\{?[23]\}?)?")
_SIMPLE_FRACTION_RE = re.compile(r"(-?\d{1,64})/(\d{1,64})")
_UNICODE_TABLE = str.maketrans(
    {
        "\u2212": "-",  # minus sign
        "\u2012": "-",  # figure dash
        "\u2013": "-",  # en dash, often typed as a minus
        "\ufe63": "-",  # small hyphen-minus
        "\uff0d": "-",  # full-width hyphen-minus
        "\u00a0": " ",  # no-break space
        "\u2009": " ",  # thin space
        "\u202f": " ",  # narrow no-break space
        "\u2007": " ",  # figure space
        "\u200b": "",  # zero-width space
        "\u00b0": "",  # degree sign
        "\x00": "",  # NUL
    }
)


# --- Counters -------------------------------------------------------------------------------
class _Counters:
    """Thread-safe call and failure counters; picklable (the lock is recreated)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0

    def add_call(self) -> int:
        """Count one scored sample; return its 1-based number."""
        with self._lock:
            self.calls += 1
            return self.calls

    def add_failure(self) -> None:
        """Count one sample whose scoring raised internally."""
        with self._lock:
            self.failures += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"calls": self.calls, "failures": self.failures}

    def __getstate__(self) -> dict:
        return self.snapshot()

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.calls = state.get("calls", 0)
        self.failures = state.get("failures", 0)


_COUNTERS = _Counters()


def reward_stats() -> dict:
    """Return ``{"calls": n, "failures": k}`` for this process (``reward_func`` samples, internal errors)."""
    return _COUNTERS.snapshot()


# --- Prompt and Harmony handling ------------------------------------------------------
def strip_prompt(query: str, prompt: str) -> str:
    """Return the response part of an OpenRLHF query (prompt + response).

    The query normally starts with the prompt. When it does not (the prompt was
    truncated on the left, or the tokenizer does not round-trip it), the text
    after the prompt's last ``PROMPT_TAIL_CHARS`` characters is used, then the
    text after the last assistant turn marker, else nothing, so that the
    prompt's own numbers and boxes are never scored. An empty or missing prompt
    means the query is the response.

    >>> strip_prompt("Q: put it in \\\\boxed{}. A: 7", "Q: put it in \\\\boxed{}.")
    ' A: 7'
    >>> strip_prompt("<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>7", "other")
    '<|channel|>final<|message|>7'
    """
    try:
        if not isinstance(query, str):
            return ""
        if not isinstance(prompt, str) or not prompt:
            return query
        if query.startswith(prompt):
            return query[len(prompt) :]
        tail = prompt[-PROMPT_TAIL_CHARS:]
        at = query.find(tail)
        if at >= 0:
            return query[at + len(tail) :]
        end = -1
        for marker in ASSISTANT_MARKERS:
            at = query.rfind(marker)
            if at >= 0:
                end = max(end, at + len(marker))
        return query[end:] if end >= 0 else ""
    except Exception:  # noqa: BLE001 - never raise into the trainer
        _COUNTERS.add_failure()
        return ""


def _has_harmony_tokens(text: str) -> bool:
    # "<" first: one-character searches are memchr-fast, two-character ones are not.
    return "<" in text and "<|" in text and (CHANNEL_TOKEN in text or MESSAGE_TOKEN in text)


def _first_special_token(text: str, start: int) -> int:
    """Index of the first ``<|name|>`` token at or after ``start``, else ``len(text)``.

    Looks for the token's closing ``|>`` first (one fast scan when there is none)
    and checks the few characters before it; a token cannot straddle a ``|>``
    that does not close it, so the final regex search may start after the
    ``|>`` occurrences already ruled out.
    """
    if text.find(">", start) < 0:
        return len(text)
    pos = start
    for _ in range(MAX_FINAL_CANDIDATES):
        close = text.find("|>", pos)
        if close < 0:
            return len(text)
        m = _SPECIAL_TOKEN_RE.search(text, max(pos, close - 66), close + 2)
        if m:
            return m.start()
        pos = close + 1
    m = _SPECIAL_TOKEN_RE.search(text, pos)
    return m.start() if m else len(text)


def _final_span(text: str, harmony: bool | None = None) -> tuple[int, int, bool]:
    """Locate the answer message: ``(start, end, final_channel_found)``.

    ``start == end == 0`` with ``False`` means a Harmony response without a
    final message (no answer). Plain text spans the text up to its first special
    token.
    """
    if harmony is None:
        harmony = _has_harmony_tokens(text)
    if harmony:
        at = text.rfind(FINAL_HEADER)
        for _ in range(MAX_FINAL_CANDIDATES):
            if at < 0:
                break
            header_start = at + len(FINAL_HEADER)
            limit = header_start + MAX_HEADER_CHARS + len(MESSAGE_TOKEN)
            msg = text.find(MESSAGE_TOKEN, header_start, limit)
            if msg >= 0:
                header = text[header_start:msg]
                if (not header or header[0] in " <") and not any(b in header for b in HEADER_BREAKERS):
                    start = msg + len(MESSAGE_TOKEN)
                    return start, _first_special_token(text, start), True
            at = text.rfind(FINAL_HEADER, 0, at)
        return 0, 0, False
    stripped_headers = "assistant" in text  # one scan instead of three on text without them
    at = text.rfind(STRIPPED_FINAL_HEADER) if stripped_headers else -1
    if at >= 0:
        return at + len(STRIPPED_FINAL_HEADER), len(text), True
    first = _LEADING_SPACE_RE.match(text).end()
    for word in STRIPPED_NONFINAL_STARTS:
        after = first + len(word)
        if text.startswith(word, first) and after < len(text) and (text[after].isalnum() or text[after] in "\\$(*#"):
            return 0, 0, False
    if stripped_headers and any(h in text for h in STRIPPED_NONFINAL_HEADERS):
        return 0, 0, False
    at = text.find("<|") if "<" in text else -1
    return 0, (_first_special_token(text, at) if at >= 0 else len(text)), False


def extract_final_text(response: str) -> str:
    """Return the text whose answer counts: the Harmony final-channel message, or the plain text.

    Returns ``""`` for a Harmony response without a final message.

    >>> extract_final_text("<|channel|>analysis<|message|>\\\\boxed{1}<|end|><|start|>assistant<|channel|>final<|message|>2<|return|>")
    '2'
    >>> extract_final_text("analysisThink: 1.assistantfinalIt is 2.")
    'It is 2.'
    >>> extract_final_text("analysisStill thinking about 1")
    ''
    """
    try:
        if not isinstance(response, str):
            return ""
        start, end, _ = _final_span(response)
        return response[start:end]
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        return ""


# --- Answer extraction ------------------------------------------------------------------
def _match_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_at``, or -1 (escaped braces ignored)."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_at, min(len(text), open_at + MAX_BOXED_CHARS)):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _find_last_box(text: str) -> tuple[str | None, int, int]:
    """``(content, start, unclosed_start)`` of the last ``\\boxed``/``\\fbox``.

    Only the last box argument decides. A complete box gives its content and
    start, with ``unclosed_start`` -1. A box whose brace never closes (a
    response cut off inside the box) gives ``(None, -1, its start)``; no box at
    all gives ``(None, -1, -1)``. ``\\boxed`` not followed by an argument
    (prose, ``\\boxedsomething``) is skipped.
    """
    if "\\" not in text:
        return None, -1, -1
    found = {macro: text.rfind(macro) for macro in BOX_MACROS}
    for _ in range(MAX_BOX_CANDIDATES):
        macro = max(found, key=found.__getitem__)
        at = found[macro]
        if at < 0:
            return None, -1, -1
        arg = at + len(macro)
        k = arg
        while k < len(text) and k - arg < 8 and text[k] in " \t\n":
            k += 1
        if k < len(text) and text[k] == "{":
            close = _match_brace(text, k)
            if close < 0:
                return None, -1, at
            return text[k + 1 : close], at, -1
        if k > arg and k < len(text):
            m = _SPACE_BOX_ARG_RE.match(text, k)
            if m and (m.group()[0] in _DIGITS or m.group()[0] in "+-.\u2212"):
                return m.group(), at, -1
        found[macro] = text.rfind(macro, 0, at)
    return None, -1, -1


def _last_number(text: str) -> str | None:
    """The last number-like token of ``text`` (sign included), or None.

    Thousands separators ``,``, ``{,}`` and ``\\,`` are kept inside the token;
    a token whose commas are not thousands groups, or longer than
    ``MAX_NUMBER_CHARS``, is not a number.
    """
    tail_from = max(0, len(text) - 4 * MAX_NUMBER_CHARS)
    end = max(text.rfind(d, tail_from) for d in _DIGITS)  # most texts end near a digit
    if end < 0 and tail_from:
        end = max(text.rfind(d, 0, tail_from + 1) for d in _DIGITS)
    if end < 0:
        return None
    i = end
    while i > 0:
        if end - i > MAX_NUMBER_CHARS:
            return None
        c = text[i - 1]
        if c == "," and i >= 2 and text[i - 2] == "\\":
            i -= 2
        elif c in _DIGITS or c in ",.":
            i -= 1
        elif c == "}" and text.endswith("{,}", 0, i):
            i -= 3
        else:
            break
    token = text[i : end + 1].replace("{,}", ",").replace("\\,", ",").lstrip(",")
    if token.startswith(".") and i > 0 and text[i - 1].isalpha():
        token = token.lstrip(".")  # "Eq.5" or "step.3": the period ends a word
    if not _NUMBER_TOKEN_RE.fullmatch(token):
        return None
    if i >= 1 and text[i - 1] in "-\u2212":
        before = text[i - 2] if i >= 2 else " "
        if not (before.isalnum() or before in ")]}"):
            token = "-" + token
    return token


def _extract(text: str) -> tuple[str | None, int, int]:
    """``(answer, parse_method, box_start)``; box_start is -1 without a complete box.

    After an unclosed last box only the text from that box on is searched for
    a number, so an earlier, revised answer is not paid for.
    """
    content, box_at, unclosed_at = _find_last_box(text)
    if box_at >= 0:
        content = content.strip()
        return (content or None), (PARSE_BOXED if content else PARSE_NONE), box_at
    number = _last_number(text[unclosed_at:] if unclosed_at >= 0 else text)
    return number, (PARSE_LAST_NUMBER if number is not None else PARSE_NONE), -1


def extract_answer(text: str) -> tuple[str | None, int]:
    """Return ``(answer, parse_method)``: 2 from the last box, 1 from the last number, 0 none.

    >>> extract_answer("First \\\\boxed{3}, then \\\\boxed{\\\\frac{1}{2}}.")
    ('\\\\frac{1}{2}', 2)
    >>> extract_answer("so the total is 1,024 apples")
    ('1,024', 1)
    >>> extract_answer("values 12,15")
    (None, 0)
    """
    try:
        if not isinstance(text, str) or not text:
            return None, PARSE_NONE
        answer, method, _ = _extract(text)
        return answer, method
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        return None, PARSE_NONE


# --- Normalization ----------------------------------------------------------------------
def _canonical_number(s: str) -> str | None:
    """Canonical digit string of a plain number (``-1,024.50`` -> ``-1024.5``), else None."""
    m = _NUMBER_RE.fullmatch(s)
    if not m:
        return None
    sign, whole, frac = m.group(1), m.group(2).replace(",", ""), m.group(3) or ""
    if not whole and not frac:
        return None
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    if sign == "-" and out != "0":
        out = "-" + out
    return out


def _unwrap_delimiters(s: str) -> str:
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)]
    return s


def _unwrap_macro(s: str) -> str:
    """``\\text{X}`` (and other wrappers) or ``{X}`` spanning the whole string -> ``X``."""
    m = _MACRO_START_RE.match(s)
    if m and m.group(1) in WRAPPER_MACROS:
        if m.group(1) == "displaystyle":
            return s[m.end() :]
        if m.end() < len(s) and s[m.end()] == "{" and _match_brace(s, m.end()) == len(s) - 1:
            return s[m.end() + 1 : -1]
        return s
    if s.startswith("{") and _match_brace(s, 0) == len(s) - 1:
        return s[1:-1]
    return s


def _strip_units(s: str) -> str:
    """Drop a unit after a number: ``15\\text{ cm}``, ``15 cm``, ``12 square units``, ``25\\%``."""
    s = _DEGREE_RE.sub("", s).replace("\\$", "").strip()
    for suffix in ("\\%", "%"):
        if s.endswith(suffix):
            s = s[: -len(suffix)].rstrip()
    if s.endswith("}"):
        at = max(s.rfind(macro + "{") for macro in UNIT_MACROS)
        if at > 0:
            open_at = s.index("{", at)
            if _match_brace(s, open_at) == len(s) - 1:
                unit = s[open_at + 1 : -1].strip()
                head = s[:at].strip()
                if _is_unit(unit) and _canonical_number(" ".join(head.split())) is not None:
                    s = head
    words = s.split()
    if 2 <= len(words) <= 4:
        for n_unit in (1, 2):
            head, unit = words[:-n_unit], words[-n_unit:]
            if head and all(_UNIT_WORD_RE.fullmatch(w) for w in unit):
                if _canonical_number(" ".join(head)) is not None:
                    return " ".join(head)
    return s


def _is_unit(text: str) -> bool:
    words = text.split()
    return 1 <= len(words) <= 3 and all(_UNIT_WORD_RE.fullmatch(w) for w in words)


def _strip_assignment(s: str) -> str:
    """``x = 5`` -> ``5`` when the left side is a variable name (``x``, ``n_1``, ``f(3)``, ``\\theta``)."""
    eq = s.find("=")
    if eq > 0 and _IDENTIFIER_RE.fullmatch(s[:eq].strip()):
        return s[s.rfind("=") + 1 :]
    return s


def _normalize(value) -> tuple[str, bool]:
    """``(canonical string, is_number)``; ``("", False)`` for anything unusable."""
    if isinstance(value, bool) or value is None:
        return "", False
    if isinstance(value, numbers.Number) and type(value) not in (int, float) and callable(getattr(value, "item", None)):
        # A numpy integer or float scalar (a label read from parquet): its Python number. np.float64
        # subclasses float but its repr is "np.float64(5.0)", which Decimal cannot read.
        value = value.item()
    if isinstance(value, bool):
        return "", False
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return "", False
        value = format(Decimal(repr(value)), "f")
    elif not isinstance(value, str):
        return "", False
    if len(value) > MAX_ANSWER_CHARS:
        return "", False
    s = value.translate(_UNICODE_TABLE).replace("{,}", ",")
    for _ in range(MAX_NORMALIZE_PASSES):
        before = s
        s = _SPACING_RE.sub(" ", _THIN_SPACE_THOUSANDS_RE.sub(",", s)).strip()
        s = s.rstrip(".").rstrip()
        s = _unwrap_delimiters(s).strip()
        s = _unwrap_macro(s).strip()
        s = _strip_units(s)
        s = _strip_assignment(s).strip()
        if s == before:
            break
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = " ".join(s.split())
    number = _canonical_number(s)
    if number is not None:
        return number, True
    s = s.replace(" ", "")
    m = _SIMPLE_FRACTION_RE.fullmatch(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s, False


def normalize_answer(s) -> str:
    """Canonical form of an answer or a label (numbers become plain digit strings).

    >>> [normalize_answer(x) for x in ["$1{,}000$", "\\\\text{042}.", "\u22125", "90^\\\\circ", "x = 5", "15\\\\text{ cm}"]]
    ['1000', '42', '-5', '90', '5', '15']
    >>> normalize_answer("\\\\dfrac{1}{2}")
    '\\\\frac{1}{2}'
    """
    try:
        return _normalize(s)[0]
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        return ""


def _numbers_equal(a: str, b: str) -> bool:
    """Compare canonical numbers: integers exactly, decimals within the tolerance."""
    if a == b:
        return True
    if "." not in a or "." not in b:
        return False
    if len(a) > MAX_NUMBER_CHARS or len(b) > MAX_NUMBER_CHARS:
        return False
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    return abs(x - y) <= Decimal(str(NUMERIC_TOLERANCE)) * max(Decimal(1), abs(y))


def _match(pred, label) -> bool:
    return _compare(*_normalize(pred), *_normalize(label))


def _compare(p: str, p_num: bool, gold: str, gold_num: bool) -> bool:
    if not p or not gold:
        return False
    if p_num and gold_num:
        return _numbers_equal(p, gold)
    if p_num or gold_num:
        return False
    return p == gold


def answers_match(pred, label) -> bool:
    """True when the normalized prediction equals the normalized label.

    >>> answers_match("\\\\boxed{1,000}", "1000"), answers_match("100001", "100000"), answers_match("12.0", "12")
    (True, False, True)
    """
    try:
        return _match(pred, label)
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        return False


# --- Scoring ------------------------------------------------------------------------------
def _looks_truncated(response: str, has_box: bool, harmony: bool) -> bool:
    """Heuristic: Harmony text without a stop token; else long without a box, or ending mid-sentence."""
    tail = response[-MAX_NUMBER_CHARS:].rstrip()
    if not tail:
        return False
    if harmony:
        return not tail.endswith(STOP_TOKENS)
    if not has_box and len(response) >= LONG_RESPONSE_CHARS:
        return True
    last = tail[-1]
    return last.isalpha() or last in ",;:([{=+-*/\\^_&"


def _empty_result(error: bool) -> dict:
    result = {"reward": REWARD_WRONG}
    result.update(dict.fromkeys(EXTRA_LOG_KEYS, 0.0))
    result["reward_error"] = 1.0 if error else 0.0
    return result


def _score(response: str, label) -> tuple[dict, str | None]:
    if not isinstance(response, str):
        return _empty_result(error=True), None
    gold, gold_num = _normalize(label)
    harmony = _has_harmony_tokens(response)
    start, end, has_final = _final_span(response, harmony)
    answer, method, box_at = _extract(response[start:end])
    pred, pred_num = _normalize(answer) if answer is not None else ("", False)
    has_answer = bool(pred)
    correct = _compare(pred, pred_num, gold, gold_num)
    in_final = box_at >= 0 and start + box_at >= (1.0 - BOXED_IN_FINAL_FRACTION) * len(response)
    result = {
        "reward": REWARD_CORRECT if correct else REWARD_WRONG,
        "correctness": 1.0 if correct else 0.0,
        "has_answer": 1.0 if has_answer else 0.0,
        "has_boxed": 1.0 if box_at >= 0 else 0.0,
        "parse_method": float(method) if has_answer else float(PARSE_NONE),
        "boxed_in_final": 1.0 if in_final else 0.0,
        "truncated_response": 1.0 if _looks_truncated(response, box_at >= 0, harmony) else 0.0,
        "has_final_channel": 1.0 if has_final else 0.0,
        "reward_error": 0.0 if gold else 1.0,
    }
    return result, answer


def score_response(response: str, label) -> dict:
    """Score one response (prompt already removed): ``{"reward": r, <every EXTRA_LOG_KEYS key>: float}``.

    Never raises; an internal error gives reward 0.0 with ``reward_error`` 1.0.

    >>> r = score_response("analysisMaybe \\\\boxed{41}.assistantfinalThe answer is $\\\\boxed{42}$.", 42)
    >>> r["reward"], r["parse_method"], r["has_final_channel"]
    (1.0, 2.0, 1.0)
    """
    return score_with_answer(response, label)[0]


def score_with_answer(response: str, label) -> tuple[dict, str | None]:
    """:func:`score_response` and the answer it compared, as extracted (None when there is none).

    Never raises. The answer is the raw text of the box or number, before normalization.

    >>> result, answer = score_with_answer("<|channel|>final<|message|>So \\\\boxed{1{,}024}.<|return|>", "1024")
    >>> result["reward"], answer
    (1.0, '1{,}024')
    """
    try:
        return _score(response, label)
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        return _empty_result(error=True), None


def _debug_line(number: int, response, label, result: dict, answer) -> None:
    try:
        tail = response[-200:] if isinstance(response, str) else type(response).__name__
        stats = reward_stats()
        sys.stdout.write(
            f"[reward_func_em] sample {number} (failures so far {stats['failures']}): "
            f"reward={result['reward']} parse_method={result['parse_method']} "
            f"answer={answer!r:.80} label={label!r:.80} response_tail={tail!r}\n"
        )
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a debug print must never cost a sample
        pass


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _score_sample(query, prompt, label) -> tuple[dict, str | None]:
    try:
        response = strip_prompt(query, prompt)
        result, answer = _score(response, label)
        if not isinstance(query, str):
            result["reward_error"] = 1.0
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        result, answer, response = _empty_result(error=True), None, query
    number = _COUNTERS.add_call()
    if DEBUG_EVERY > 0 and number % DEBUG_EVERY == 0:
        _debug_line(number, response, label, result, answer)
    return result, answer if isinstance(answer, str) else None


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF's entry point: score each query (prompt + response) against its label.

    OpenRLHF 0.9.3 passes lists of length 1; the result then holds Python floats,
    which its experience maker turns into shape-[1] tensors, and the extracted answer
    (:data:`TEXT_LOG_KEYS`), which rft's patched experience maker carries to the samples log::

        {"rewards": 1.0, "scores": 1.0, "extra_logs": {"correctness": 1.0, ..., "extracted_answer": "7"}}

    For longer lists every value is a list, one item per sample. Missing
    prompts or labels count as empty. Never raises.

    >>> out = reward_func(["Solve.<|start|>assistant<|channel|>final<|message|>\\\\boxed{7}<|return|>"], ["Solve."], ["7"])
    >>> out["rewards"], out["scores"], out["extra_logs"]["parse_method"], out["extra_logs"]["extracted_answer"]
    (1.0, 1.0, 2.0, '7')
    """
    try:
        qs, ps, ls = _as_list(queries), _as_list(prompts), _as_list(labels)
        results = [
            _score_sample(q, ps[i] if i < len(ps) else None, ls[i] if i < len(ls) else None)
            for i, q in enumerate(qs)
        ]
    except Exception:  # noqa: BLE001
        _COUNTERS.add_failure()
        results = [(_empty_result(error=True), None)]
    rewards = [r["reward"] for r, _ in results]
    logs = {key: [r[key] for r, _ in results] for key in EXTRA_LOG_KEYS}
    logs["extracted_answer"] = [answer for _, answer in results]
    if len(results) == 1:
        return {"rewards": rewards[0], "scores": rewards[0], "extra_logs": {k: v[0] for k, v in logs.items()}}
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": logs}
