"""The phantom's case definition and result: :class:`CaseSpec`, :class:`PhantomCase`, constants.

Constants: the fields of view (:data:`FOVS`), contrast phases, patient positions, the HU range
of the output CT (:data:`HU_MIN`, :data:`HU_MAX`; CT is int16 HU clipped to [-1024, 3071]) and
the tissue classes of :attr:`PhantomCase.tissue` (:data:`TISSUES`, ids ``T_*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

FOVS = ("neck", "chest", "abdomen", "whole", "verse_crop")
CONTRAST_PHASES = ("native", "arterial", "portal")
POSITIONS = ("supine", "prone")

HU_MIN, HU_MAX = -1024, 3071

# tissue classes of :attr:`PhantomCase.tissue`
TISSUES = {
    0: "air", 1: "fat", 2: "muscle", 3: "soft_organ", 4: "lung", 5: "gas", 6: "blood",
    7: "fluid", 8: "disc", 9: "cortical_bone", 10: "cancellous_bone", 11: "metal",
    12: "table", 13: "cartilage", 14: "brain",
}
T_AIR, T_FAT, T_MUSCLE, T_ORGAN, T_LUNG, T_GAS, T_BLOOD, T_FLUID, T_DISC = range(9)
T_CORT, T_CANC, T_METAL, T_TABLE, T_CART, T_BRAIN = range(9, 15)


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines one synthetic case. Deterministic from ``seed``.

    Attributes:
        seed: patient seed; anatomy draws depend only on it (and the counts/curvature), so
            the same seed on another grid or field of view is the same patient.
        n_thoracic: 11, 12 or 13 thoracic vertebrae (13 -> T13 = label 28).
        n_lumbar: 4, 5 or 6 lumbar vertebrae. 6 = sacral lumbarization (L6 = label 25);
            4 = lumbar sacralization (L5 fused into the sacrum, unlabelled, no label 24).
        sacralization: the last lumbar vertebra is transitional: broad, wing-like transverse
            processes that nearly touch the sacral alae (Castellvi-like), disc kept.
        fov: ``neck`` (skull base to upper chest), ``chest`` (lung apex to L1/L2),
            ``abdomen`` (T10/T11 to below the hips), ``whole`` (skull base to hips),
            ``verse_crop`` (small in-plane FOV centred on the spine, a run of levels).
        spacing_mm: (x, y, z) voxel spacing in mm.
        slice_thickness_mm: reconstructed thickness (box profile along z); None = z spacing.
        noise_hu: standard deviation of the (in-plane correlated) image noise, HU.
        contrast_phase: ``native``, ``arterial`` or ``portal``.
        metal: posterior spinal fusion (pedicle screws and rods) with streak artefacts.
        body_scale: 0.8 (slim) .. 1.4 (obese): subcutaneous and visceral fat, body outline.
        lordosis, kyphosis: multipliers of the normal cervical/lumbar lordosis and thoracic
            kyphosis angles (1 = average adult).
        scoliosis_mm: lateral deviation of the thoracolumbar apex (mm); 0 = straight.
        stump_ribs: the last rib pair is a short stump (3-5 cm).
        colon_gas: insufflated colon (CT colonography).
        position: ``supine`` or ``prone`` (table side, fluid levels; geometry stays in
            patient coordinates).
        fov_xy_mm: square in-plane field of view (mm); None = by ``fov`` and body size.
        fov_center_offset_mm: (x, y) shift of the in-plane FOV centre from its default.
        z_range_mm: explicit (inferior, superior) world z extent; None = by ``fov``.
        crop_levels: for ``verse_crop``: (first, last) label of the run of vertebrae to
            include; None = drawn from the seed.
        bone_density: multiplier of cancellous HU (0.6 osteoporotic .. 1.2 dense).
        scan_seed: acquisition seed: FOV jitter, noise and streaks. Two scans of one patient
            (prone/supine, time points) share ``seed`` and differ in ``scan_seed``.
        lung_opacity: fraction (0..0.5) of lung with ground-glass opacities (COVID-19 scans).
        center_on_spine: centre the in-plane FOV on the spine instead of the body (spine
            reconstructions such as VerSe's complete scans; use with ``fov_xy_mm``).
    """

    seed: int = 0
    n_thoracic: int = 12
    n_lumbar: int = 5
    sacralization: bool = False
    fov: str = "whole"
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    slice_thickness_mm: float | None = None
    noise_hu: float = 12.0
    contrast_phase: str = "native"
    metal: bool = False
    body_scale: float = 1.0
    lordosis: float = 1.0
    kyphosis: float = 1.0
    scoliosis_mm: float = 0.0
    stump_ribs: bool = False
    colon_gas: bool = False
    position: str = "supine"
    fov_xy_mm: float | None = None
    fov_center_offset_mm: tuple[float, float] = (0.0, 0.0)
    z_range_mm: tuple[float, float] | None = None
    crop_levels: tuple[int, int] | None = None
    bone_density: float = 1.0
    scan_seed: int = 0
    lung_opacity: float = 0.0
    center_on_spine: bool = False

    def __post_init__(self):
        errors = []
        if self.n_thoracic not in (11, 12, 13):
            errors.append(f"n_thoracic={self.n_thoracic} (expected 11, 12 or 13)")
        if self.n_lumbar not in (4, 5, 6):
            errors.append(f"n_lumbar={self.n_lumbar} (expected 4, 5 or 6)")
        if self.fov not in FOVS:
            errors.append(f"fov={self.fov!r} (expected one of {FOVS})")
        if self.contrast_phase not in CONTRAST_PHASES:
            errors.append(f"contrast_phase={self.contrast_phase!r} (expected one of {CONTRAST_PHASES})")
        if self.position not in POSITIONS:
            errors.append(f"position={self.position!r} (expected one of {POSITIONS})")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            errors.append(f"spacing_mm={self.spacing_mm} (expected three positive mm values)")
        if self.slice_thickness_mm is not None and self.slice_thickness_mm <= 0:
            errors.append(f"slice_thickness_mm={self.slice_thickness_mm} (expected > 0)")
        if not 0.5 <= self.body_scale <= 2.0:
            errors.append(f"body_scale={self.body_scale} (expected 0.5..2.0)")
        if self.noise_hu < 0:
            errors.append(f"noise_hu={self.noise_hu} (expected >= 0)")
        if errors:
            raise ValueError("invalid CaseSpec: " + "; ".join(errors))

    @property
    def variant(self) -> str:
        """``normal``, ``L6`` (sacral lumbarization), ``L5_missing`` (lumbar sacralization),
        ``T11`` / ``T13`` (thoracic count), joined by ``+`` when several apply."""
        parts = []
        if self.n_lumbar == 6:
            parts.append("L6")
        elif self.n_lumbar == 4:
            parts.append("L5_missing")
        if self.n_thoracic != 12:
            parts.append(f"T{self.n_thoracic}")
        return "+".join(parts) or "normal"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        ct: int16 HU, shape (x, y, z), RAS+ voxel order.
        mask: uint8 vertebra labels (0 background), same shape.
        affine: 4x4 voxel -> world (RAS, mm).
        centroids: {label: (x, y, z) world mm}, centre of mass of each label in ``mask``.
        body_centroids: {label: (x, y, z) world mm}, the VerSe-style vertebral-body centroid of
            each label in ``mask``: the centre of mass of the part of the vertebral body solid
            that lies in the field of view (C1, which has no body, and a vertebra whose body is
            wholly outside the field of view: the centre of mass of its mask).
        spec: the spec it was generated from.
        tissue: uint8 tissue class per voxel (:data:`TISSUES`), at the slice centres.
        ribs: uint8, the label of the vertebra a rib voxel belongs to (0 elsewhere); ribs
            are bone in ``ct`` but unlabelled in ``mask``.
        info: anatomy facts for tests and the oracle: ``rib_levels`` (labels carrying ribs),
            ``levels`` (name -> label, body centre world mm), ``labels_expected`` (labels the
            anatomy has, in or out of the FOV).
    """

    ct: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    centroids: dict[int, tuple[float, float, float]]
    spec: CaseSpec
    tissue: np.ndarray
    ribs: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    body_centroids: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


def with_spec(spec: CaseSpec, **changes) -> CaseSpec:
    """A copy of ``spec`` with fields changed (validated)."""
    return replace(spec, **changes)
