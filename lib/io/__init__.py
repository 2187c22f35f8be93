"""File formats (layer 1): atomic writes, NIfTI, integrity checks, DICOM read and write.

The NIfTI, atomic-write and integrity API is re-exported here (``from lib.io import
load_volume``); the DICOM modules are imported by name (:mod:`lib.io.dicom_read`,
:mod:`lib.io.dicom_write`).
"""

from lib.io.atomic import (
    PARTIAL_DIR,
    atomic_path,
    atomic_write,
    link_or_copy,
    move_atomic,
    write_text,
)
from lib.io.integrity import (
    DEFAULT_AFFINE_ATOL_MM,
    FAULT_KINDS,
    Fault,
    IntegrityError,
    affine_offset_mm,
    check_image,
    check_mask,
    check_pair,
    grid_faults,
    image_faults,
    label_counts,
    load_checked,
    load_mask,
    load_pair,
    mask_faults,
    read_mask,
    require_pair,
    smallest_int_dtype,
    verify_case,
)
from lib.io.nifti import (
    FAST_GZIP,
    NIBABEL_GZ_OPENER,
    NIFTI_SUFFIXES,
    NiftiFile,
    NiftiReadError,
    Volume,
    canonical_geometry,
    load_ct,
    load_volume,
    nifti_bytes,
    open_nifti,
    register_fast_gzip,
    save_like,
    save_volume,
    spacing_from_affine,
    strip_nifti_suffix,
    to_canonical_order,
    to_original_order,
)

__all__ = [
    "DEFAULT_AFFINE_ATOL_MM", "FAULT_KINDS", "affine_offset_mm", "check_image", "check_mask", "grid_faults",
    "image_faults", "label_counts", "load_checked", "load_ct", "load_mask", "load_pair", "mask_faults", "open_nifti", "read_mask",
    "smallest_int_dtype", "verify_case", "NiftiFile",
    "FAST_GZIP", "NIBABEL_GZ_OPENER", "NIFTI_SUFFIXES", "PARTIAL_DIR", "Fault", "IntegrityError", "NiftiReadError",
    "Volume", "atomic_path", "canonical_geometry", "atomic_write", "check_pair", "link_or_copy", "load_volume", "move_atomic",
    "nifti_bytes", "register_fast_gzip", "require_pair", "save_like", "save_volume", "spacing_from_affine",
    "strip_nifti_suffix", "to_canonical_order", "to_original_order", "write_text",
]
