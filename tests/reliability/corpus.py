"""The fault corpus's entries: an id, the area, the fault in words, and the check that injects it
into tiny ci-sized data, runs the code a user would run, and asserts the handled outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    id: str
    area: str
    fault: str
    check: Callable

    def __repr__(self) -> str:  # the parametrised test's id
        return self.id


def faults(*entries: Fault) -> list:
    """``pytest.mark.parametrize("fault", faults(...), ids=...)`` helper: entries sorted by id."""
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate fault ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    return sorted(entries, key=lambda e: e.id)


def scenario(test_fn: Callable, told: str, **given) -> Callable:
    """A check that runs another suite's test of the same fault (one scenario, not two copies):
    its arguments are taken from ``given`` or, by name, from the fixtures (``tmp_path``,
    ``monkeypatch``, ``project``, ``sources``, ...); ``told`` is the outcome for the table."""
    import inspect

    def check(run):
        names = inspect.signature(test_fn).parameters
        kwargs = {n: given[n] if n in given else run.tmp if n == "tmp_path" else run.fixture(n) for n in names}
        test_fn(**kwargs)
        run.told(told)
    return check
