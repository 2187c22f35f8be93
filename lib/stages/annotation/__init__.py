"""Stage 03_annotation (notebook ``notebooks/03_annotation.ipynb``): the annotation rounds.

* :mod:`lib.stages.annotation.stage` - the notebook's steps and the wiring (truth, predictor,
  fine-tuner, the human round);
* :mod:`lib.stages.annotation.loop` - batches, the resumable loop, the rounds table;
* :mod:`lib.stages.annotation.tiers` - the simulated annotators' error and time models;
* :mod:`lib.stages.annotation.ledger` - the SQLite ledger;
* :mod:`lib.stages.annotation.itksnap` - the ITK-SNAP export and validated import.
"""

from lib.stages.annotation.ledger import Ledger
from lib.stages.annotation.stage import (
    STAGE,
    queue_tables,
    record,
    run,
    save_case_view,
    setup,
    start,
    truth_provider,
    write_release_readme,
    write_residual,
    write_round_tables,
)
from lib.stages.context import print_environment

__all__ = ["STAGE", "Ledger", "print_environment", "queue_tables", "record", "run", "save_case_view", "setup", "start",
           "truth_provider", "write_release_readme", "write_residual", "write_round_tables"]
