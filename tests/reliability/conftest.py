"""The fault corpus: every fault is a parametrised case (:class:`tests.reliability.corpus.Fault`)
whose check asserts the handled outcome -- a clear error naming the file and the fault, the run
going on where it should, the failure listed, nothing silently wrong in the tables -- and returns
that outcome in words. The session ends with the corpus table (fault -> outcome) in the terminal,
and in ``$SPINE1K_CORPUS_MD`` when that is set (``make reliability`` writes
``runs/reliability_corpus.md``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.app.test_pipeline import project  # noqa: F401  (fixtures the corpus's checks reuse)
from tests.reliability.corpus import Fault
from tests.stages.conftest import sources  # noqa: F401
from tests.stages.test_curation_split_file import nifti_sources  # noqa: F401

_RESULTS: list[tuple[Fault, str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    fault = getattr(item, "callspec", None) and item.callspec.params.get("fault")
    if not isinstance(fault, Fault):
        return
    if rep.when == "call":
        told = getattr(item, "_corpus_outcome", "")
        _RESULTS.append((fault, "handled" if rep.passed else "NOT HANDLED",
                         told if rep.passed else str(rep.longrepr).splitlines()[-1][:160]))
    elif rep.when == "setup" and rep.failed:
        _RESULTS.append((fault, "NOT HANDLED", "setup failed"))


@pytest.fixture
def run(request, tmp_path, monkeypatch):
    """What a fault's check gets: ``run.tmp`` (its folder), ``run.monkeypatch``, and
    ``run.told("what happened")`` -- the outcome written into the corpus table -- and
    ``run.fixture(name)`` for the fixtures of the suites whose scenarios a check reuses."""
    def _tell(text: str) -> None:
        request.node._corpus_outcome = text
    return SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, told=_tell, fixture=request.getfixturevalue)


def corpus_table(results) -> str:
    lines = ["| # | area | fault | outcome | how |", "|---|---|---|---|---|"]
    for f, status, how in sorted(results, key=lambda r: r[0].id):
        how = re.sub(r"/\S*/", "", how).replace("|", "/")  # file names without their folders
        lines.append(f"| {f.id} | {f.area} | {f.fault} | {status} | {how} |")
    handled = sum(s == "handled" for _, s, _ in results)
    lines.append(f"\n{handled} of {len(results)} faults handled well.")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    text = corpus_table(_RESULTS)
    terminalreporter.section("fault corpus")
    terminalreporter.write_line(text)
    target = os.environ.get("SPINE1K_CORPUS_MD")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text("# Fault corpus (tests/reliability)\n\n" + text + "\n")
