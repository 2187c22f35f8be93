"""Fault corpus, curation and the annotation import: the split file cannot leak a case, a stale mask
never stays beside a new image, a moved workspace still reads its tables, and the ITK-SNAP import
refuses every bad mask but a T13 where the data may hold one. The scenarios are the curation and
annotation tests' own (tiny trees laid out like the downloads); here each is one corpus entry."""

from __future__ import annotations

import pytest

from tests.reliability.corpus import Fault, faults, scenario
from tests.stages import test_curation_split_file as split_tests
from tests.stages.annotation import test_itksnap as itksnap_tests
from tests.stages.annotation import test_itksnap_t13 as t13_tests

FAULTS = faults(
    Fault("cu-01", "01", "a one-character typo in a test_public ID of data_split.txt", scenario(
        split_tests.test_a_typo_in_a_test_id_stops_curation_naming_file_line_and_the_case,
        "SplitFileError before any conversion: file, line 7, the ID and 'did you mean ...'")),
    Fault("cu-02", "01", "the typo with split_unlisted: exclude", scenario(
        split_tests.test_the_misspelled_test_case_never_lands_in_any_split_and_both_sides_are_tabled,
        "the case is in no split; both sides in split_problems.csv", policy="exclude")),
    Fault("cu-03", "01", "the typo with split_unlisted: seeded", scenario(
        split_tests.test_the_misspelled_test_case_never_lands_in_any_split_and_both_sides_are_tabled,
        "the look-alike of a test ID is never seeded into trainset; tabled", policy="seeded")),
    Fault("cu-04", "01", "an included case the split file does not list", scenario(
        split_tests.test_an_unlisted_case_is_an_error_or_split_by_the_seeded_rule_and_tabled,
        "SplitFileError naming it; with seeded, split by the rule and tabled")),
    Fault("cu-05", "01", "re-curation picks another series for a case", scenario(
        split_tests.test_recuration_with_another_series_moves_the_old_mask_out_and_lists_it,
        "the old mask is moved to superseded/ and listed in superseded.csv")),
    Fault("cu-06", "01", "the workspace is moved to another folder", scenario(
        split_tests.test_cases_table_paths_find_the_release_after_the_workspace_moves,
        "cases.csv paths are profile-relative and resolve in the new place")),
    Fault("cu-07", "01", "split_unlisted: skip (no such policy)", scenario(
        split_tests.test_split_unlisted_must_be_a_known_policy, "ValueError naming the value and the choices")),
    Fault("an-01", "03", "an ITK-SNAP edit holding T13 on VerSe-style data", scenario(
        t13_tests.test_t13_is_accepted_only_where_the_data_may_hold_it_and_other_faults_still_refused,
        "accepted where the case may hold T13; every other bad mask still refused")),
    Fault("an-02", "03", "an ITK-SNAP edit with a wrong grid / label / dtype", scenario(
        itksnap_tests.test_human_import_refuses_bad_masks_and_keeps_them_queued,
        "refused with the reason, the case stays queued")),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
