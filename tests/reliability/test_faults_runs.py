"""Fault corpus, running the study: concurrent runs, kills, stale stages, user errors, read-only
folders, raw downloads laid out wrongly. Most scenarios are the pipeline's, curation's and the
downloads check's own tests; here each is one corpus entry with its outcome."""

from __future__ import annotations

import pytest

from tests.app import test_lock, test_pipeline
from tests.datasets import test_downloads
from tests.reliability.corpus import Fault, faults, scenario
from tests.stages import test_curation
from tests.stages.annotation import test_loop


def _usage(argv, expect):
    def check(run):
        test_pipeline.test_user_errors_are_one_line_with_exit_status_2(argv, expect, run.fixture("capsys"))
        run.told(f"exit 2, one line: ...{expect}")
    return check


FAULTS = faults(
    Fault("ru-01", "run", "a second `make reproduce` on a profile while one runs", scenario(
        test_lock.test_a_live_holder_is_refused_with_its_pid_then_the_lock_is_taken_after_it_dies,
        "refused (exit 4) naming the holder's PID and command; taken over once it died")),
    Fault("ru-02", "run", "a lock file left by a run that died", scenario(
        test_lock.test_a_stale_lock_file_without_a_live_holder_is_taken_over, "taken over, the run resumes")),
    Fault("ru-03", "run", "a raw source file changed after its stage ran", scenario(
        test_pipeline.test_freshness_follows_the_data_a_forced_upstream_and_edited_upstream_outputs,
        "downstream re-runs, log says 'input data changed (1 file(s) differ)'; forced or edited upstream too")),
    Fault("ru-04", "run", "a stage that lists failed cases", scenario(
        test_pipeline.test_failed_cases_are_counted_and_give_exit_status_3,
        "counted in the log and pipeline.json, exit status 3")),
    Fault("ru-05", "run", "--stages 09 (no such stage)", _usage(["--stages", "09"], "no stage 09")),
    Fault("ru-06", "run", "--stages abc", _usage(["--stages", "abc"], "accepted forms")),
    Fault("ru-07", "run", "--profile synthtic", _usage(["--profile", "synthtic"], "did you mean 'synthetic'?")),
    Fault("ru-08", "run", "a read-only stage folder", scenario(
        test_pipeline.test_a_read_only_stage_folder_is_one_clear_error, "one error naming the folder, no traceback")),
    Fault("ru-09", "run", "a params typo", scenario(
        test_pipeline.test_params_typo_stops_before_anything_runs, "stops before any stage runs, naming the file")),
    Fault("ru-10", "run", "a notebook cell raises", scenario(
        test_pipeline.test_failure_names_stage_and_cell, "stage FAILED with the cell, the error, the notebook")),
    Fault("ru-11", "run", "changed params after an interrupted run", scenario(
        test_pipeline.test_rerun_with_new_inputs_starts_clean_but_an_interrupted_run_resumes,
        "stale outputs set aside to .previous/, same inputs resume")),
    Fault("ru-12", "03", "kill -9 in the middle of an annotation round", scenario(
        test_loop.test_kill_9_mid_round_then_resume_equals_uninterrupted,
        "resumes; ledger and tables equal an uninterrupted run")),
    Fault("ru-13", "01", "kill -9 during release placement", scenario(
        test_curation.test_run_killed_during_placement_resumes_to_the_same_release,
        "resumes to the same release")),
    Fault("ru-14", "01", "broken DICOM series (missing slice, mixed UIDs, no PixelSpacing, noise)", scenario(
        test_curation.test_faulty_series_are_excluded_with_reasons_and_the_others_converted,
        "each excluded with its reason; the others converted")),
    Fault("ru-15", "00", "downloads: images folder missing, a volume twice", scenario(
        test_downloads.test_missing_images_folder_and_duplicate_volumes_are_named, "each named in source_problems")),
    Fault("ru-16", "00", "downloads: both MSD folder names at once", scenario(
        test_downloads.test_msd_folder_under_its_other_name_and_both_names_at_once, "stops naming both folders")),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)

