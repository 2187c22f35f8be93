"""Synthetic spine CT: a seeded anatomical phantom in Hounsfield units with vertebra labels.

``generate_case(CaseSpec(...))`` returns a CT volume (int16 HU), its vertebra label map
(:mod:`lib.core.labels` values), the RAS affine and the label centroids. The anatomy is built from
signed-distance primitives in world millimetres, so the same patient can be sampled on any
grid: a coarse synthetic grid (2 mm) or paper scale (512 x 512, 0.75 mm).

What is modelled (and why it matters downstream), module by module:

* :mod:`~lib.synthetic.phantom.spec`: the case definition (:class:`CaseSpec`: counts,
  variants, field of view, grid, acquisition) and result (:class:`PhantomCase`), the tissue
  classes and HU range.
* :mod:`~lib.synthetic.phantom.anatomy`: the spine laid out in world mm (C1..C7,
  T1..T11/12/13, L1..L4/5/6, sacrum, coccyx; lordosis, kyphosis, scoliosis), the body and
  organ parameters, the body outline per slice.
* :mod:`~lib.synthetic.phantom.bone`: vertebrae with cortical shell and cancellous bone,
  discs (the dark gaps a model uses to separate levels), ribs on every thoracic vertebra and
  only there (the counting landmark from above), sternum, shoulder girdle, sacrum, pelvis and
  femora (unlabelled: the landmark from below, and the source of false positives), skull.
* :mod:`~lib.synthetic.phantom.soft_tissue`: body outline, fat, muscle, lungs, heart,
  vessels (contrast phase), abdominal organs, airway, colon (colonography gas with a fluid
  level that follows gravity), the patient table, metal implants with streaks.
* :mod:`~lib.synthetic.phantom.scan`: field of view and grid, rendering in blocks of thin
  slices, slice thickness by averaging thin slices along z (not by dropping slices),
  correlated noise, centroids.
* :mod:`~lib.synthetic.phantom.sdf` and :mod:`~lib.synthetic.phantom.canvas`: the
  signed-distance primitives and world-fixed noise, and the block being painted.

Conventions: arrays are ``(x, y, z)`` in RAS+ voxel order (the index grows towards the
patient's Right, Anterior, Superior); world coordinates are millimetres, RAS. CT is int16 HU clipped to
[-1024, 3071]; masks are uint8.
"""

from __future__ import annotations

from lib.synthetic.phantom.anatomy import Anatomy, Segment, build_anatomy
from lib.synthetic.phantom.bone import anat_scale
from lib.synthetic.phantom.scan import (
    body_centroids,
    compute_centroids,
    generate_case,
    generate_scans,
    plan_grid,
    retain_heap,
)
from lib.synthetic.phantom.soft_tissue import COLON_RADIUS_MM, FLUID_HU
from lib.synthetic.phantom.spec import (
    CONTRAST_PHASES,
    FOVS,
    HU_MAX,
    HU_MIN,
    POSITIONS,
    T_AIR,
    T_BLOOD,
    T_BRAIN,
    T_CANC,
    T_CART,
    T_CORT,
    T_DISC,
    T_FAT,
    T_FLUID,
    T_GAS,
    T_LUNG,
    T_METAL,
    T_MUSCLE,
    T_ORGAN,
    T_TABLE,
    TISSUES,
    CaseSpec,
    PhantomCase,
    with_spec,
)

__all__ = [
    "COLON_RADIUS_MM", "CONTRAST_PHASES", "FLUID_HU", "FOVS", "HU_MAX", "HU_MIN", "POSITIONS", "TISSUES",
    "T_AIR", "T_BLOOD", "T_BRAIN", "T_CANC", "T_CART", "T_CORT", "T_DISC", "T_FAT", "T_FLUID", "T_GAS",
    "T_LUNG", "T_METAL", "T_MUSCLE", "T_ORGAN", "T_TABLE",
    "Anatomy", "CaseSpec", "PhantomCase", "Segment",
    "anat_scale", "body_centroids", "build_anatomy", "compute_centroids", "generate_case", "generate_scans", "plan_grid",
    "retain_heap", "with_spec",
]
