"""Row conventions shared by the per-case evaluation, the identification rate and the summaries.

Per label (the ``status`` of a row of :func:`lib.metrics.case.evaluate_case`):

* absent in truth and prediction -> not evaluated (no row);
* present in both -> ``"detected"``: every metric computed;
* present in truth only -> ``"missed"``: Dice 0, NSD 0, HD95/ASSD ``NaN`` (missing, never
  a made-up number), not identified; counted as missed;
* present in prediction only -> ``"false_positive"``: a false-positive vertebra; Dice,
  distances and identification ``NaN`` (per-label statistics are over the labels present in
  the truth), counted as a false positive.

The binary spine (label > 0) gets the same treatment in a row with ``label == 0`` and
``name == "spine"``.
"""

SPINE_LABEL = 0
SPINE_NAME = "spine"
DETECTED, MISSED, FALSE_POSITIVE = "detected", "missed", "false_positive"

METRIC_COLUMNS = ("dice", "hd95", "assd", "nsd")
"""Per-row metric keys that summaries average."""
