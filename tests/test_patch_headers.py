"""The series stays small and every patch says what it is: the targets of a patch series rft can live with.

Each patch keeps only imports and call sites into rft's own modules (``rft/openrlhf/``): at most
80 added lines a patch and 400 over the series. Each header says what it changes, why, and what
upstream change retires it (DEP-3 fields), and carries a diffstat that matches its body.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import oprl

PATCHES = sorted((oprl.PATCHES).glob("*.patch"))
MAX_ADDED_PER_PATCH = 80
MAX_ADDED_SERIES = 400


def _split(patch: Path) -> tuple[str, str]:
    text = patch.read_text()
    cut = text.index("\n--- a/") + 1
    return text[:cut], text[cut:]


def _added(body: str) -> int:
    return sum(1 for line in body.splitlines() if line.startswith("+") and not line.startswith("+++"))


def test_every_patch_file_is_in_the_series():
    assert sorted(oprl.series_names()) == [p.name for p in PATCHES]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_a_patch_is_only_hooks(patch):
    added = _added(_split(patch)[1])
    assert added <= MAX_ADDED_PER_PATCH, f"{patch.name} adds {added} lines: move the logic into rft/openrlhf/"


def test_the_series_is_small():
    total = sum(_added(_split(p)[1]) for p in PATCHES)
    assert total <= MAX_ADDED_SERIES, f"the series adds {total} lines"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_header_says_what_why_and_what_retires_it(patch):
    header = _split(patch)[0]
    assert re.search(r"^Description: \S", header, re.M)
    assert re.search(r"^Forwarded: (no|not-needed|https?://\S+)$", header, re.M)
    assert re.search(r"^Last-Update: \d{4}-\d{2}-\d{2}$", header, re.M)
    assert re.search(r"\bretire", header, re.I), f"{patch.name}: say what upstream change retires it"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_header_diffstat_matches_the_body(patch):
    header, body = _split(patch)
    counted: dict[str, list[int]] = {}
    name = None
    for line in body.splitlines():
        if line.startswith("+++ b/"):
            name = line[6:].split("\t")[0]
            counted[name] = [0, 0]
        elif name and line.startswith("+"):
            counted[name][0] += 1
        elif name and line.startswith("-") and not line.startswith("--- a/"):
            counted[name][1] += 1
    stated = {m.group(1): int(m.group(2)) for m in re.finditer(r"^ (\S+) +\| +(\d+) [+-]*$", header, re.M)}
    assert stated == {f: a + r for f, (a, r) in counted.items()}, patch.name
    total = re.search(r"^ (\d+) files? changed(?:, (\d+) insertions?\(\+\))?(?:, (\d+) deletions?\(-\))?$", header, re.M)
    assert total, f"{patch.name}: no diffstat summary line"
    assert [int(g or 0) for g in total.groups()] == [
        len(counted), sum(a for a, _ in counted.values()), sum(r for _, r in counted.values())]
