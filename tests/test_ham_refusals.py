"""docs/headers.md's "real ham refused" column is what bench/ham_refusals.py measures.

The measurement runs as the documented command (a real process, ``--json``);
every default-reject rule must show "n of N" with the measured figure, every
other rule "—". When the rules (or the corpora) change, the failure names each
row that must change and what to write.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gateway.message.findings import REJECT, RULES

from conftest import CORPORA, REPO, need

DOC = REPO / "docs" / "headers.md"
COLUMN = "real ham refused"
_ROW = re.compile(r"\| `(?P<id>[a-z0-9_.]+)` \|")


def doc_table() -> dict[str, dict[str, str]]:
    """finding id -> {column name: cell} of the finding table in docs/headers.md."""
    lines = DOC.read_text().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| finding id |"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        m = _ROW.match(ln)
        assert m and len(cells) == len(names), f"docs/headers.md: malformed finding table row {ln!r}"
        rows[m["id"]] = dict(zip(names, cells))
    return rows


@pytest.fixture(scope="module")
def measured() -> dict:
    need(CORPORA.is_dir(), f"shared corpora not found at {CORPORA}")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "ham_refusals.py"), "--json", "--corpora", str(CORPORA)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_doc_table_lists_every_rule_with_its_default():
    rows = doc_table()
    assert list(rows) == list(RULES), "docs/headers.md: the finding table must list RULES in order"
    for rid, row in rows.items():
        assert row["default"] == RULES[rid].default, (
            f"docs/headers.md: row `{rid}`, column 'default': change {row['default']!r} to {RULES[rid].default!r}")


def test_real_ham_refused_column_matches_the_measurement(measured):
    assert measured["total"] >= 100, measured["groups"]  # the corpora were found and read
    rows = doc_table()
    wrong: list[str] = []
    for rid, rule in RULES.items():
        want = (f"{measured['rules'][rid]['refused']} of {measured['total']}" if rule.default == REJECT else "—")
        have = rows.get(rid, {}).get(COLUMN)
        if have != want:
            files = measured["rules"].get(rid, {}).get("files") or []
            why = f" (refused: {', '.join(files)})" if files else ""
            wrong.append(f"docs/headers.md: row `{rid}`, column '{COLUMN}': change {have!r} to {want!r}{why}")
    if f"N = {measured['total']} messages" not in DOC.read_text():
        wrong.append(f"docs/headers.md: the paragraph under the finding table: write 'N = {measured['total']} messages'")
    assert not wrong, "\n".join(["the ham figures in docs/headers.md are out of date "
                                 "(python3 bench/ham_refusals.py shows them):", *wrong])


def test_every_ham_group_is_found(measured):
    # a corpus path that matches nothing would silently shrink N
    from bench.ham_refusals import HAM
    assert set(measured["groups"]) == {g for g, _, _ in HAM}
    assert measured["groups"]["spamassassin nice"] == 61
    assert measured["groups"]["spamassassin nice.mbox"] == 3
    assert measured["groups"]["dkim test-pass/test-fail"] == 32
