"""nnU-Net v2 as a backend of the workspace (the optional ``nnunet`` extra): nnU-Net plans,
preprocesses, trains and predicts; the workspace exports the data and evaluates.

Nothing here imports nnU-Net in this process: every step runs as a child process
(:mod:`lib.ml.nnunet.tools`). :func:`missing_reason` says whether it can run here.
"""

from lib.ml.nnunet.backend import (
    REDUCED_PLANS,
    IntegrityReport,
    NnunetIntegrityError,
    NnunetTrainResult,
    Plan,
    plan_and_preprocess,
    predict,
    train,
    verify_dataset,
)
from lib.ml.nnunet.tools import (
    INSTALL_HINT,
    TRAINER,
    NnunetError,
    NnunetFolders,
    NnunetMissingError,
    missing_reason,
    require,
)

__all__ = ["INSTALL_HINT", "REDUCED_PLANS", "TRAINER", "IntegrityReport", "NnunetError", "NnunetFolders",
           "NnunetIntegrityError", "NnunetMissingError", "NnunetTrainResult", "Plan", "missing_reason",
           "plan_and_preprocess", "predict", "require", "train", "verify_dataset"]
