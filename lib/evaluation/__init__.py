"""Evaluation (layer 3): folders of predictions -> per-case CSV + summary JSON, Table 2.

* :mod:`lib.evaluation.folders` - match files, evaluate pairs and folders, write the results;
* :mod:`lib.evaluation.summary` - statistics (``summary.json``) and per-case scores;
* :mod:`lib.evaluation.table2` - Table 2 in the paper's layout;
* :mod:`lib.evaluation.cli` - ``spine1k evaluate`` / ``python -m lib.evaluation``.
"""

from lib.datasets.paper_facts import MEAN_OF_SPINE, MEAN_OF_VERTEBRAE, PAPER_TABLE2
from lib.evaluation.folders import (
    AFFINE_ATOL_MM,
    PER_CASE_CSV,
    RESULTS_MANIFEST,
    SUMMARY_JSON,
    TABLE2_CSV,
    TABLE2_MD,
    ResultsError,
    case_id_of,
    evaluate_folders,
    evaluate_pair,
    evaluate_pairs,
    failed_rows,
    failure_record,
    match_cases,
    read_results,
    truth_faults,
    verify_results,
    write_results,
)
from lib.evaluation.summary import CONVENTIONS, FAILED, SCORED_STATUSES, case_scores, summarise
from lib.evaluation.table2 import (
    COUNT_ROWS,
    build_table2,
    failure_lines,
    paper_set_name,
    table2_markdown,
)

__all__ = [
    "COUNT_ROWS", "FAILED", "RESULTS_MANIFEST", "SCORED_STATUSES", "ResultsError", "failed_rows", "failure_lines",
    "failure_record", "read_results", "truth_faults", "verify_results",
    "AFFINE_ATOL_MM", "CONVENTIONS", "MEAN_OF_SPINE", "MEAN_OF_VERTEBRAE", "PAPER_TABLE2", "PER_CASE_CSV",
    "SUMMARY_JSON", "TABLE2_CSV", "TABLE2_MD", "build_table2", "case_id_of", "case_scores", "evaluate_folders",
    "evaluate_pair", "evaluate_pairs", "match_cases", "paper_set_name", "summarise", "table2_markdown",
    "write_results",
]
