"""Fault corpus, curation and the annotation import: the split file cannot leak a case, a stale mask
never stays beside a new image, a moved workspace still reads its tables, and the ITK-SNAP import
refuses every bad mask but a T13 where the data may hold one. The scenarios are the curation and
annotation tests' own (tiny trees laid out like the downloads); here each is one corpus entry."""

from __future__ import annotations

import pytest

from lib.core import paths
from tests.helpers.curation_sources import write_covid, write_task03_liver
from tests.reliability.corpus import Fault, faults
from tests.stages import test_curation_split_file as split_tests
from tests.stages.annotation import test_itksnap as itksnap_tests
from tests.stages.annotation import test_itksnap_t13 as t13_tests
from tests.stages.test_curation_split_file import _write_split


def _sources():
    root = paths.for_profile("ci").sources
    write_task03_liver(root)
    write_covid(root)
    _write_split(root / "data_split.txt")
    return root


def _scenario(fn, told, *, needs_sources=False, needs_tmp=False, **kw):
    def check(run):
        args = []
        if needs_sources:
            args.append(_sources())
        if needs_tmp:
            args.append(run.tmp)
        if "monkeypatch" in kw:
            kw["monkeypatch"] = run.monkeypatch
        fn(*args, **kw)
        run.told(told)
    return check


FAULTS = faults(
    Fault("cu-01", "01", "a one-character typo in a test_public ID of data_split.txt", _scenario(
        split_tests.test_a_typo_in_a_test_id_stops_curation_naming_file_line_and_the_case,
        "SplitFileError before any conversion: file, line 7, the ID and 'did you mean ...'", needs_sources=True)),
    Fault("cu-02", "01", "the typo with split_unlisted: exclude", _scenario(
        split_tests.test_the_misspelled_test_case_never_lands_in_any_split_and_both_sides_are_tabled,
        "the case is in no split; both sides in split_problems.csv", needs_sources=True, policy="exclude")),
    Fault("cu-03", "01", "the typo with split_unlisted: seeded", _scenario(
        split_tests.test_the_misspelled_test_case_never_lands_in_any_split_and_both_sides_are_tabled,
        "the look-alike of a test ID is never seeded into trainset; tabled", needs_sources=True, policy="seeded")),
    Fault("cu-04", "01", "an included case the split file does not list", _scenario(
        split_tests.test_an_unlisted_case_is_an_error_or_split_by_the_seeded_rule_and_tabled,
        "SplitFileError naming it; with seeded, split by the rule and tabled", needs_sources=True)),
    Fault("cu-05", "01", "re-curation picks another series for a case", _scenario(
        split_tests.test_recuration_with_another_series_moves_the_old_mask_out_and_lists_it,
        "the old mask is moved to superseded/ and listed in superseded.csv")),
    Fault("cu-06", "01", "the workspace is moved to another folder", _scenario(
        split_tests.test_cases_table_paths_find_the_release_after_the_workspace_moves,
        "cases.csv paths are profile-relative and resolve in the new place", needs_sources=True, needs_tmp=True,
        monkeypatch=None)),
    Fault("cu-07", "01", "split_unlisted: skip (no such policy)", _scenario(
        split_tests.test_split_unlisted_must_be_a_known_policy, "ValueError naming the value and the choices")),
    Fault("an-01", "03", "an ITK-SNAP edit holding T13 on VerSe-style data", _scenario(
        t13_tests.test_t13_is_accepted_only_where_the_data_may_hold_it_and_other_faults_still_refused,
        "accepted where the case may hold T13; every other bad mask still refused", needs_tmp=True)),
    Fault("an-02", "03", "an ITK-SNAP edit with a wrong grid / label / dtype", _scenario(
        itksnap_tests.test_human_import_refuses_bad_masks_and_keeps_them_queued,
        "refused with the reason, the case stays queued", needs_tmp=True)),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
