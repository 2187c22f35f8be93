"""The one case type of the workspace, and a seeded hold-out split of cases.

A :class:`Case` is one CT volume as every stage sees it: its id (the release or VerSe id), the
image file, its truth mask (which may not exist yet: annotation writes it), the split or test
set it belongs to, and, once predicted, the prediction file. Training and fingerprinting take
``(case_id, image, mask)`` triples (:meth:`Case.triple`), the picklable form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Case:
    """One CT case.

    Attributes:
        case_id: release ID (``liver_12``, ``HN_P001``...) or VerSe scan stem (``sub-verse004``).
        image: CT NIfTI (HU, any orientation).
        mask: truth label map on the image grid (release ``gt/<ID>_seg.nii.gz``, a VerSe
            derivative); None when the case has none. The file may not exist yet.
        split: release split (``trainset``, ``test_public``, ``test_private``) or the evaluation
            set (``Test_VerSe``, ``heldout``...) the case belongs to; "" when not assigned.
        prediction: a predicted label map of the case, when one is attached.
    """

    case_id: str
    image: Path
    mask: Path | None = None
    split: str = ""
    prediction: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "image", Path(self.image))
        for name in ("mask", "prediction"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def triple(self) -> tuple[str, str, str]:
        """``(case_id, image, mask)`` as strings (training, fingerprints, job files)."""
        if self.mask is None:
            raise ValueError(f"case {self.case_id}: no mask ({self.image})")
        return (self.case_id, str(self.image), str(self.mask))

    def with_prediction(self, path: str | Path | None) -> Case:
        """The same case with ``prediction`` set."""
        return replace(self, prediction=None if path is None else Path(path))


def split_cases(cases: Sequence, n_holdout: int, seed: int = 0) -> tuple[list, list]:
    """Seeded split into ``(train, held_out)``; ``n_holdout`` cases are held out (input order kept)."""
    cases = list(cases)
    if not 0 <= n_holdout < len(cases):
        raise ValueError(f"cannot hold out {n_holdout} of {len(cases)} cases")
    pick = set(np.random.default_rng(seed).permutation(len(cases))[:n_holdout].tolist())
    return [c for i, c in enumerate(cases) if i not in pick], [c for i, c in enumerate(cases) if i in pick]
