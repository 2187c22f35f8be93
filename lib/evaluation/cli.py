"""``spine1k evaluate`` (also ``python -m lib.evaluation``): evaluate two folders and write the tables.

Exit status: 0 every case scored; 3 some case failed (each listed on stderr: id, file, fault;
its rows are scored Dice 0 in the tables); 2 usage error (bad arguments, a missing folder:
one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lib import metrics
from lib.core import labels as lab
from lib.core.parallel import CaseFailuresError
from lib.evaluation.folders import (
    PER_CASE_CSV,
    RESULTS_MANIFEST,
    SUMMARY_JSON,
    TABLE2_CSV,
    TABLE2_MD,
    evaluate_folders,
)

EXIT_OK, EXIT_USAGE, EXIT_FAILED_CASES = 0, 2, 3


def _fault_text(failure: dict) -> str:
    """A failure's fault without the leading file name (printed beside it)."""
    lines = str(failure.get("message", "")).strip().splitlines()
    msg = lines[0] if lines else ""
    file = str(failure.get("file", "") or "")
    return msg[len(file) + 2:] if file and msg.startswith(f"{file}: ") else msg


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate two folders and write the tables. Returns the exit status
    (:data:`EXIT_OK`, :data:`EXIT_FAILED_CASES` when some case failed, :data:`EXIT_USAGE`)."""
    ap = argparse.ArgumentParser(prog="spine1k evaluate",
                                 description="Per-vertebra Dice, HD95, ASSD, NSD and identification "
                                             "of predicted label maps against truths.")
    ap.add_argument("--gt", required=True, help="folder of truths (ID_seg.nii.gz or ID.nii.gz)")
    ap.add_argument("--pred", required=True, help="folder of predictions (ID.nii.gz)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--labels", default="1-25", help="labels to report, e.g. 1-25, C1-L6, 1-25,28")
    ap.add_argument("--hd95", default="pooled", choices=sorted(metrics.HD95_DEFINITIONS),
                    help="HD95 definition: pooled (medpy, nnU-Net v1) or max (MONAI, surface-distance)")
    ap.add_argument("--nsd-tolerance-mm", type=float, default=metrics.DEFAULT_NSD_TOLERANCE_MM)
    ap.add_argument("--workers", type=int, default=None, help="local processes (0 = in process)")
    ap.add_argument("--scheduler", default=None, help="Dask distributed scheduler address")
    ap.add_argument("--missing", default="empty", choices=("empty", "exclude"),
                    help="score a missing prediction as empty (default) or only list it")
    ap.add_argument("--set-name", default=None, help="test-set name for Table 2 (default: from --gt)")
    ap.add_argument("--id-rule", default=metrics.DEFAULT_IDENTIFICATION_RULE, choices=metrics.IDENTIFICATION_RULES,
                    help="identification rule: verse_get_hits (the official VerSe evaluator) or "
                         "nearest_prediction (nearest predicted centroid to each true one)")
    ap.add_argument("--centroids", default="body", choices=metrics.CENTROID_METHODS,
                    help="centroids from the masks: body (vertebral-body centroids, VerSe) or mass (whole label)")
    ap.add_argument("--no-centroid-files", action="store_true",
                    help="ignore VerSe centroid files beside the truths (estimate from the masks)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        labels = lab.parse_label_range(args.labels)
        df, summary = evaluate_folders(args.gt, args.pred, args.out, labels=labels, hd95=args.hd95,
                                       workers=args.workers, scheduler=args.scheduler,
                                       nsd_tolerance_mm=args.nsd_tolerance_mm, missing=args.missing,
                                       on_error="collect", set_name=args.set_name,
                                       progress=not args.no_progress, identification_rule=args.id_rule,
                                       centroids=args.centroids, centroid_files=not args.no_centroid_files)
    except (ValueError, OSError, CaseFailuresError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    mov, mos = summary["mean_of_vertebrae"], summary["mean_of_spine"]
    print(f"{summary['n_cases']} cases ({summary['n_missing_cases']} missing predictions, "
          f"{summary['n_failed_cases']} failed); HD95 definition: {summary['hd95_definition']}")
    print(f"identification: {summary['identification']['text']}")
    print(f"Mean of Vertebrae: DSC {mov['dice']['mean']:.3f}  HD95 {mov['hd95']['mean']:.2f} mm  "
          f"ID rate {mov['identification_rate_pooled']:.3f}  missed {mov['missed']}  "
          f"false positives {mov['false_positive']}")
    if mos:
        print(f"Mean of Spine:     DSC {mos['dice']['mean']:.3f}  HD95 {mos['hd95']['mean']:.2f} mm")
    for cid in summary["missing_cases"]:
        print(f"missing prediction: {cid}", file=sys.stderr)
    for f in summary["failed_cases"]:
        print(f"failed case {f['case_id']}: {f.get('file') or '-'}: [{f.get('kind', 'error')}] {_fault_text(f)}",
              file=sys.stderr)
    print(f"wrote {Path(args.out) / PER_CASE_CSV}, {SUMMARY_JSON}, {TABLE2_CSV}, {TABLE2_MD}, {RESULTS_MANIFEST}")
    return EXIT_FAILED_CASES if summary["failed_cases"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
