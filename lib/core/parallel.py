"""Map a function over cases: in-process, local processes, or a Dask distributed cluster.

One helper serves every per-case stage (conversion, preprocessing, inference, evaluation):

    result = map_cases(fn, cases, workers=2, on_error="collect", desc="evaluate")
    result.values       # {case_id: return value} for the cases that finished
    result.failures     # [CaseFailure(case_id, message)] for the ones that raised

``workers=0`` runs in this process (easiest to debug); ``workers=N`` uses N local processes;
``scheduler="tcp://host:port"`` sends the work to a running Dask distributed scheduler.
Results always come back keyed by case id in input order, whatever order workers finish in.

Local processes are started with ``spawn`` (:data:`START_METHOD`): a fresh interpreter per
worker, never a fork of a parent that has already run torch / OpenMP threads (a forked child
of such a parent can crash or hang), and with the parent's current environment. So ``fn`` must
be importable by a child (module level). A worker process that dies (killed for memory, a
crash in native code) fails only the case it was running: the cases it took down with it
are retried, each alone, and the cases not yet started go on in a fresh pool.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


@dataclass(frozen=True)
class CaseFailure:
    """A case whose function raised: its id and the error message (type: text)."""

    case_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.message}"


class CaseFailuresError(RuntimeError):
    """Raised by ``on_error="raise"`` after the map with every failure listed."""

    def __init__(self, failures: list[CaseFailure]):
        self.failures = failures
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(f"{len(failures)} case(s) failed:\n{lines}")


@dataclass
class MapResult:
    """What a map over cases produced."""

    values: dict[str, Any] = field(default_factory=dict)
    failures: list[CaseFailure] = field(default_factory=list)

    @property
    def failed_ids(self) -> list[str]:
        return [f.case_id for f in self.failures]

    def summary(self) -> str:
        s = f"{len(self.values)} done, {len(self.failures)} failed"
        if self.failures:
            s += ": " + ", ".join(self.failed_ids)
        return s


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call(fn: Callable, item: Any) -> tuple[bool, Any]:
    """Run ``fn(item)`` and return (ok, value or message); keeps worker processes alive."""
    try:
        return True, fn(item)
    except Exception as exc:  # collected and reported per case by the caller
        return False, _describe(exc) + "\n" + traceback.format_exc(limit=3)


START_METHOD = "spawn"
"""How local worker processes start (``multiprocessing`` start method)."""

WORKER_DIED = "worker process died (killed for memory?)"
"""Failure message of a case whose worker process died while running it (alone)."""


def _call_marked(fn: Callable, item: Any, mark: str) -> tuple[bool, Any]:
    """:func:`_call` in a worker process, after leaving the file ``mark`` (this case started)."""
    Path(mark).touch()
    return _call(fn, item)


def _check_importable(fn: Callable) -> None:
    """Raise if worker processes could not get ``fn`` (a lambda, a local or interactive function)."""
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ValueError(f"map_cases: {fn!r} cannot be sent to worker processes ({_describe(exc)}); "
                         f"define it at module level or use workers=0") from exc
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise ValueError(f"map_cases: {getattr(fn, '__qualname__', fn)!r} is defined interactively (notebook "
                         f"or console); worker processes cannot import it: move it to a module or use workers=0")


def default_workers() -> int:
    """Local worker count: ``$SPINE1K_WORKERS`` or the CPUs available to this process."""
    env = os.environ.get("SPINE1K_WORKERS")
    if env:
        return max(0, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def map_cases(fn: Callable[[Any], Any], cases: Iterable[Any], *, ids: Iterable[Hashable] | None = None,
              workers: int | None = None, scheduler: str | None = None, on_error: str = "raise",
              desc: str | None = None, progress: bool = True) -> MapResult:
    """Apply ``fn`` to every case.

    Args:
        fn: a function of one case; with local processes it must be importable by a child
            process (module level, not defined in a notebook cell or a lambda).
        cases: the inputs; each must be picklable for process or Dask execution.
        ids: case ids (default: ``str(case)``, or ``case["case_id"]`` / ``case.case_id``).
        workers: 0 = in this process; N = N local processes; None = :func:`default_workers`.
        scheduler: address of a Dask distributed scheduler (``tcp://127.0.0.1:8786``);
            when given, work goes there and ``workers`` is ignored.
        on_error: ``"collect"`` records failures and goes on; ``"raise"`` also goes on, then
            raises :class:`CaseFailuresError` listing every failure.
        desc: progress bar label.
        progress: show a tqdm progress bar.

    Returns:
        :class:`MapResult` with values in input order and the failures (a case whose worker
        process died: :data:`WORKER_DIED`).

    Raises:
        ValueError: ``on_error`` unknown, ids not matching the cases, or (local processes) a
            ``fn`` worker processes could not import.
        CaseFailuresError: ``on_error="raise"`` and some case failed.
    """
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    items = list(cases)
    keys = [str(k) for k in ids] if ids is not None else [_case_id(c) for c in items]
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} ids for {len(items)} cases")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate case ids: {dup}")
    outcomes: dict[str, tuple[bool, Any]] = {}
    bar = tqdm(total=len(items), desc=desc, disable=not progress or not items, leave=False)
    try:
        if scheduler:
            _run_dask(fn, items, keys, scheduler, outcomes, bar)
        else:
            n = default_workers() if workers is None else workers
            if n <= 0 or len(items) <= 1:
                for key, item in zip(keys, items, strict=True):
                    outcomes[key] = _call(fn, item)
                    bar.update()
            else:
                _check_importable(fn)
                _run_local(fn, items, keys, n, outcomes, bar)
    finally:
        bar.close()
    result = MapResult()
    for key in keys:
        ok, val = outcomes[key]
        if ok:
            result.values[key] = val
        else:
            result.failures.append(CaseFailure(key, str(val).strip()))
    if result.failures and on_error == "raise":
        raise CaseFailuresError(result.failures)
    return result


def _run_local(fn: Callable, items: list[Any], keys: list[str], n: int, outcomes: dict[str, tuple[bool, Any]],
               bar) -> None:
    """Run the cases in local worker processes, surviving workers that die.

    A pool that breaks (a worker process died) has its unfinished cases sorted out: those that
    had started (the dead worker's and those of the workers the pool terminated with it) run
    again one at a time, each alone in a fresh process, so only a case whose worker dies alone
    fails, with :data:`WORKER_DIED`; the cases not yet started go on in a fresh pool.
    """
    ctx = multiprocessing.get_context(START_METHOD)
    todo = list(range(len(items)))
    with tempfile.TemporaryDirectory(prefix="spine1k-map-") as marks:
        while todo:
            broken, started = _run_pool(ctx, fn, items, keys, todo, min(n, len(todo)), outcomes, bar, marks)
            todo = [i for i in todo if keys[i] not in outcomes]
            if broken is None:
                break
            for i in started or todo:  # none marked as started (died on start-up): each case alone
                solo, _ = _run_pool(ctx, fn, items, keys, [i], 1, outcomes, bar, marks)
                if solo is not None and keys[i] not in outcomes:
                    outcomes[keys[i]] = (False, f"{WORKER_DIED}: {_describe(solo)}")
                    bar.update()
            todo = [i for i in todo if keys[i] not in outcomes]


def _run_pool(ctx, fn: Callable, items: list[Any], keys: list[str], todo: list[int], width: int,
              outcomes: dict[str, tuple[bool, Any]], bar, marks: str) -> tuple[BaseException | None, list[int]]:
    """Cases ``todo`` in one pool of ``width`` processes; the outcomes of those that finished go
    to ``outcomes``.

    Returns:
        ``(error, started)``: the :class:`BrokenProcessPool` error when a worker process died
        (else None), and the cases that had started but not finished then (``marks`` holds a
        file per started case).
    """
    broken: BaseException | None = None
    with ProcessPoolExecutor(max_workers=width, mp_context=ctx) as pool:
        futs = {pool.submit(_call_marked, fn, items[i], os.path.join(marks, str(i))): i for i in todo}
        for fut in as_completed(futs):
            try:
                outcomes[keys[futs[fut]]] = fut.result()
            except BrokenProcessPool as exc:  # a worker process died: sorted out by the caller
                broken = exc
                continue
            except Exception as exc:  # e.g. an argument or a result that does not pickle
                outcomes[keys[futs[fut]]] = (False, _describe(exc))
            bar.update()
    if broken is None:
        return None, []
    return broken, [i for i in todo if keys[i] not in outcomes and os.path.exists(os.path.join(marks, str(i)))]


def _case_id(case: Any) -> str:
    if isinstance(case, dict) and "case_id" in case:
        return str(case["case_id"])
    if hasattr(case, "case_id"):
        return str(case.case_id)
    return str(case)


def _run_dask(fn, items, keys, scheduler, outcomes, bar) -> None:
    from distributed import Client  # optional at run time: only a named scheduler needs Dask
    from distributed import as_completed as dask_completed  # (see above)

    with Client(scheduler) as client:
        futs = client.map(_call, [fn] * len(items), items, key=[f"spine1k-{k}-{i}" for i, k in enumerate(keys)],
                          pure=False)
        index = {f.key: k for f, k in zip(futs, keys, strict=True)}
        for fut in dask_completed(futs):
            try:
                outcomes[index[fut.key]] = fut.result()
            except Exception as exc:  # worker lost
                outcomes[index[fut.key]] = (False, _describe(exc))
            bar.update()
