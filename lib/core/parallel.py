"""Map a function over cases: in-process, local processes, or a Dask distributed cluster.

One helper serves every per-case stage (conversion, preprocessing, inference, evaluation):

    result = map_cases(fn, cases, workers=2, on_error="collect", desc="evaluate")
    result.values       # {case_id: return value} for the cases that finished
    result.failures     # [CaseFailure(case_id, message)] for the ones that raised

``workers=0`` runs in this process (easiest to debug); ``workers=N`` uses N local processes;
``scheduler="tcp://host:port"`` sends the work to a running Dask distributed scheduler.
Results always come back keyed by case id in input order, whatever order workers finish in.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
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
        fn: a picklable (module-level) function of one case.
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
        :class:`MapResult` with values in input order and the failures.
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
                with ProcessPoolExecutor(max_workers=min(n, len(items))) as pool:
                    futs = {pool.submit(_call, fn, item): key for key, item in zip(keys, items, strict=True)}
                    for fut in as_completed(futs):
                        try:
                            outcomes[futs[fut]] = fut.result()
                        except Exception as exc:  # worker died (e.g. killed for memory)
                            outcomes[futs[fut]] = (False, _describe(exc))
                        bar.update()
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
