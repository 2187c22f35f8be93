"""Simulated annotators: the four tiers of the paper's loop, with stated error and time models.

* A *label shift* is a run of vertebrae whose predicted label is off by the same number of
  levels (the paper's "dislocation"); it is a per-case event.
* junior: redraws every vertebra on the truth geometry but keeps the labels it was given
  (a run shifted by one level stays shifted unless caught, with probability
  ``junior.shift_catch_rate``; a label off by more levels is always fixed);
  leaves a seeded fraction ``junior.boundary_residual`` of the pre-annotation's
  foreground/background errors untouched.
* seniors (two, in turn): each catches a remaining shift with ``senior.shift_catch_rate``;
  on a variant case (L6, missing L5, T13) a caught shift is sent to the expert instead of fixed.
* expert: resolves the cases sent to it with ``expert.shift_catch_rate`` (normally 1).
* double-check: samples ``double_check.sample_fraction`` of the cases and fixes a remaining
  shift with its catch rate.

So an accepted mask differs from the truth by (a) the junior's boundary residual and (b) a
shift that every tier missed. Each tier's time: ``base_minutes + minutes_per_ml * mL changed +
minutes_per_relabel * vertebrae relabelled``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lib.core.seeding import stable_rng
from lib.imaging.label_shift import level_offsets, relabel, variant_of

TIERS = ("junior", "senior_1", "senior_2", "expert", "double_check")


MAX_MISSABLE_SHIFT = 1.0
"""Largest label offset (levels) a tier can overlook; larger ones are always corrected."""


@dataclass(frozen=True)
class TierModel:
    """Error and time model of one tier (rates are probabilities per case)."""

    shift_catch_rate: float
    base_minutes: float
    minutes_per_ml: float
    minutes_per_relabel: float
    boundary_residual: float = 0.0
    sample_fraction: float = 1.0


DEFAULT_TIERS: dict[str, TierModel] = {
    "junior": TierModel(0.3, 4.0, 0.6, 3.0, boundary_residual=0.03),
    "senior": TierModel(0.8, 2.0, 0.2, 2.0),
    "expert": TierModel(1.0, 10.0, 0.2, 5.0),
    "double_check": TierModel(0.9, 1.5, 0.2, 2.0, sample_fraction=0.2),
}


def tiers_from_params(spec: dict | None) -> dict[str, TierModel]:
    """Tier models from a params dict ``{tier: {field: value}}`` over :data:`DEFAULT_TIERS`.

    Raises:
        ValueError: an unknown tier or field, naming it.
    """
    out = dict(DEFAULT_TIERS)
    for tier, fields in (spec or {}).items():
        if tier not in out:
            raise ValueError(f"annotation tiers: unknown tier {tier!r}; expected {list(out)}")
        known = set(TierModel.__dataclass_fields__)
        bad = set(fields) - known
        if bad:
            raise ValueError(f"annotation tiers: {tier}: unknown fields {sorted(bad)}; expected {sorted(known)}")
        out[tier] = TierModel(**{**asdict(out[tier]), **fields})
    return out


def case_rng(seed: int, case_id: str, round_: int) -> np.random.Generator:
    """A generator that depends only on (seed, case, round): re-runs give the same draws."""
    return stable_rng(seed, case_id, round_, sep="|", nbytes=8, byteorder="little")


@dataclass
class TierResult:
    tier: str
    mask: np.ndarray
    minutes: float
    voxels_changed: int
    ml_changed: float
    relabelled: int
    hard_case: bool = False
    sent_to_expert: bool = False
    note: str = ""


@dataclass
class SimulatedTiers:
    """The four tiers played against a truth mask with the models in ``tiers``."""

    tiers: dict[str, TierModel] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    seed: int = 0

    def annotate(self, case_id: str, round_: int, pre: np.ndarray, truth: np.ndarray,
                 voxel_ml: float) -> list[TierResult]:
        """Run junior -> senior_1 -> senior_2 -> (expert) -> (double_check) on one case.

        Args:
            pre: the model's pre-annotation (uint8 labels), canonical array.
            truth: the truth mask on the same grid.
            voxel_ml: volume of one voxel in mL.

        Returns:
            One :class:`TierResult` per tier that touched the case; the last one's mask is
            the accepted mask.
        """
        rng = case_rng(self.seed, case_id, round_)
        variant = variant_of(truth)
        results: list[TierResult] = []
        offsets = level_offsets(truth, pre)
        shifted = any(offsets.values())

        # junior: truth geometry, labels as given unless the shift is caught
        j = self.tiers["junior"]
        caught = shifted and rng.random() < j.shift_catch_rate
        if caught:
            offsets = {v: 0 for v in offsets}
        # a label off by more than one level is obvious to anyone counting: always fixed
        offsets = {v: (o if abs(o) <= MAX_MISSABLE_SHIFT else 0) for v, o in offsets.items()}
        mask = relabel(truth, offsets)
        fg_err = (pre > 0) != (truth > 0)
        n_err = int(fg_err.sum())
        if n_err and j.boundary_residual > 0:
            keep = rng.random(n_err) < j.boundary_residual
            idx = np.flatnonzero(fg_err.ravel())[keep]
            flat = mask.ravel()  # relabel() returned a fresh array
            flat[idx] = pre.ravel()[idx]
        results.append(self._result("junior", pre, mask, j, voxel_ml, note="shift fixed" if caught else ""))

        # two seniors in turn
        sent = False
        s = self.tiers["senior"]
        for name in ("senior_1", "senior_2"):
            before = mask
            still = any(offsets.values())
            hard = bool(variant) and still
            if still and not sent and rng.random() < s.shift_catch_rate:
                if variant:
                    sent = True  # a variant: the senior flags it for the surgeon
                else:
                    offsets = {v: 0 for v in offsets}
                    mask = _fix_labels(mask, truth)
            r = self._result(name, before, mask, s, voxel_ml)
            r.hard_case, r.sent_to_expert = hard, sent
            results.append(r)

        if sent:
            e = self.tiers["expert"]
            before = mask
            if rng.random() < e.shift_catch_rate:
                offsets = {v: 0 for v in offsets}
                mask = _fix_labels(mask, truth)
            r = self._result("expert", before, mask, e, voxel_ml, note=f"resolved {variant}")
            r.hard_case = r.sent_to_expert = True
            results.append(r)

        d = self.tiers["double_check"]
        if rng.random() < d.sample_fraction:
            before = mask
            if any(offsets.values()) and rng.random() < d.shift_catch_rate:
                offsets = {v: 0 for v in offsets}
                mask = _fix_labels(mask, truth)
            results.append(self._result("double_check", before, mask, d, voxel_ml))
        return results

    @staticmethod
    def _result(tier, before, after, model: TierModel, voxel_ml, note="") -> TierResult:
        changed = before != after
        n = int(changed.sum())
        ml = n * voxel_ml
        relab = relabelled_vertebrae(before, after)
        minutes = model.base_minutes + model.minutes_per_ml * ml + model.minutes_per_relabel * relab
        return TierResult(tier, after, float(minutes), n, float(ml), relab, note=note)


def _fix_labels(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Relabel each foreground component of ``mask`` that overlaps a truth vertebra to that
    vertebra's label (the geometry, including any residual, is kept)."""
    out = mask.copy()
    fg = (mask > 0) & (truth > 0)
    out[fg] = truth[fg]
    return out


def relabelled_vertebrae(before: np.ndarray, after: np.ndarray) -> int:
    """Vertebrae (by their label after) whose majority label changed."""
    both = (before > 0) & (after > 0) & (before != after)
    if not both.any():
        return 0
    changed = np.unique(after[both])
    sizes = np.bincount(after.ravel(), minlength=32)
    moved = np.bincount(after[both], minlength=32)
    return int(sum(1 for v in changed if moved[v] > 0.5 * sizes[v]))
