"""lib.core.parallel: failures collected with their case, local processes and a real Dask cluster."""

from __future__ import annotations

import os
import signal

import pytest

from lib.core import parallel


def square_or_fail(case):
    if case["case_id"] == "liver_003":
        raise ValueError(f"corrupt input for {case['case_id']}")
    return case["x"] ** 2


CASES = [{"case_id": f"liver_{i:03d}", "x": i} for i in range(6)]


@pytest.mark.parametrize("workers", [0, 2])
def test_collect_goes_on_and_names_the_failure(workers):
    res = parallel.map_cases(square_or_fail, CASES, workers=workers, on_error="collect", progress=False)
    assert res.values == {c["case_id"]: c["x"] ** 2 for c in CASES if c["case_id"] != "liver_003"}
    assert list(res.values) == [c["case_id"] for c in CASES if c["case_id"] != "liver_003"]  # input order
    assert res.failed_ids == ["liver_003"]
    assert "ValueError: corrupt input for liver_003" in res.failures[0].message


def test_raise_lists_every_failure():
    with pytest.raises(parallel.CaseFailuresError, match="liver_003") as info:
        parallel.map_cases(square_or_fail, CASES, workers=0, progress=False)
    assert [f.case_id for f in info.value.failures] == ["liver_003"]


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="duplicate case ids"):
        parallel.map_cases(square_or_fail, CASES[:2], ids=["a", "a"], workers=0, progress=False)


def test_dask_local_cluster_on_loopback():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        res = parallel.map_cases(square_or_fail, CASES, scheduler=cluster.scheduler_address,
                                 on_error="collect", progress=False)
    assert res.values == {c["case_id"]: c["x"] ** 2 for c in CASES if c["case_id"] != "liver_003"}
    assert res.failed_ids == ["liver_003"]
    assert "corrupt input for liver_003" in res.failures[0].message


def square_or_die(case):
    """Kills its own worker process (as the kernel's OOM killer would) for liver_002."""
    if case["case_id"] == "liver_002":
        os.kill(os.getpid(), signal.SIGKILL)
    return case["x"] ** 2


def test_a_dead_worker_fails_its_case_only_and_the_rest_go_on():
    res = parallel.map_cases(square_or_die, CASES, workers=2, on_error="collect", progress=False)
    assert res.failed_ids == ["liver_002"], res.failures
    assert parallel.WORKER_DIED in res.failures[0].message
    assert res.values == {c["case_id"]: c["x"] ** 2 for c in CASES if c["case_id"] != "liver_002"}
    assert list(res.values) == [c["case_id"] for c in CASES if c["case_id"] != "liver_002"]


def test_workers_are_spawned_not_forked():
    ids = [c["case_id"] for c in CASES[:2]]
    res = parallel.map_cases(start_method, CASES[:2], workers=2, progress=False)
    assert res.values == dict.fromkeys(ids, "spawn")


def start_method(case):
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True)


def test_interactive_functions_are_refused_before_any_work():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        parallel.map_cases(lambda c: c, CASES, workers=2, progress=False)
