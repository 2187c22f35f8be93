"""NIfTI input/output with explicit geometry: the one reader and the one writer.

Conventions:
    * Arrays are processed in one canonical orientation: RAS+ voxel axes (axis 0 -> Right,
      1 -> Anterior, 2 -> Superior), reached by permuting/flipping axes only (no resampling),
      so an oblique affine stays oblique and the voxel values are untouched.
    * Saving "like" a loaded volume undoes that permutation and writes the original affine,
      so load -> process -> save round-trips geometry and voxels exactly.
    * Label maps are never interpolated here; any resampling elsewhere uses nearest neighbour.
    * Every write goes to a temporary file in the destination folder and is renamed into place.
    * ``.nii.gz`` is read through python-isal's gzip (registered as nibabel's ``.gz`` opener),
      about twice as fast as the standard library's gzip on CT volumes.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import openers, orientations

from lib.io.atomic import atomic_write

try:  # python-isal: ISA-L accelerated gzip, API-compatible with the standard gzip module
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - isal is a declared dependency
    _igzip = None


def register_fast_gzip() -> bool:
    """Make nibabel open ``.gz`` files with python-isal's gzip. Idempotent.

    Returns:
        True when the fast opener is active, False when isal is unavailable.
    """
    if _igzip is None:
        return False

    def _isal_open(filename, mode="rb", compresslevel=1, mtime=None, keep_open=False):
        # ISA-L levels are 0..3; nibabel's default (1) is valid, clamp anything higher.
        return _igzip.open(filename, mode, compresslevel=min(int(compresslevel), 3))

    spec = (_isal_open, ("mode", "compresslevel", "mtime", "keep_open"))
    for cls in (openers.Opener, openers.ImageOpener):
        cls.compress_ext_map[".gz"] = spec
    return True


NIBABEL_GZ_OPENER = openers.ImageOpener.compress_ext_map[".gz"]
"""nibabel's own (standard-library gzip) opener, kept for comparison in the benchmark."""
FAST_GZIP = register_fast_gzip()

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def strip_nifti_suffix(path: str | Path) -> str:
    """File name without ``.nii.gz``/``.nii`` (``"HN_P001_seg.nii.gz"`` -> ``"HN_P001_seg"``).

    Any other name is returned whole: release IDs such as ``1.3.6.1.4.1.9328.50.4.0001`` contain
    dots that are not extensions.
    """
    name = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


@dataclass
class Volume:
    """A volume in canonical RAS+ voxel order, with what is needed to save it back.

    Attributes:
        array: voxel data, axes (R, A, S) after canonical reorientation; dtype as stored
            (integers stay integers; scaled data become float). Usually a strided view of
            the file's (Fortran-ordered) data: copy with ``np.ascontiguousarray`` before
            handing it to code that needs C order (e.g. ``torch.from_numpy``).
        affine: 4x4 voxel -> world (RAS mm) matrix of ``array``.
        original_affine: affine of the file on disk.
        original_ornt: nibabel orientation of the file's voxel axes.
        header: the file's NIfTI header (copied).
        path: the file read, if any.
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    original_ornt: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array's three axes."""
        return spacing_from_affine(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Put an array in this volume's canonical order back into the file's voxel order."""
        return to_original_order(array, self.original_ornt)


def canonical_geometry(affine: np.ndarray, shape: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing and shape in RAS axis order (x, y, z) for any stored orientation."""
    ornt = orientations.io_orientation(affine)
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    out_sp, out_sh = [0.0] * 3, [0] * 3
    for i in range(3):
        j = int(ornt[i, 0])
        out_sp[j] = float(sp[i])
        out_sh[j] = int(shape[i])
    return tuple(out_sp), tuple(out_sh)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) per array axis: the norms of the affine's first three columns."""
    return tuple(float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


_RAS = orientations.axcodes2ornt(("R", "A", "S"))


def to_canonical_order(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Permute/flip ``array`` from the orientation ``ornt`` to RAS+ (no interpolation)."""
    return orientations.apply_orientation(array, orientations.ornt_transform(ornt, _RAS))


def to_original_order(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical_order`."""
    return orientations.apply_orientation(array, orientations.ornt_transform(_RAS, ornt))


class NiftiReadError(ValueError):
    """A NIfTI file that cannot be read; the message names the file and the fault."""


def _raw_pixdim(path: Path) -> np.ndarray | None:
    """Voxel sizes as stored in the file, before nibabel's fix-ups (None if not NIfTI-1)."""
    try:
        with openers.ImageOpener(str(path)) as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
        return np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    except Exception:  # NIfTI-2 or other formats: rely on the affine check alone
        return None


def _read_error(path: Path, exc: Exception) -> NiftiReadError:
    """The :class:`NiftiReadError` of a file nibabel failed on (gzip damage told apart)."""
    if isinstance(exc, NiftiReadError):
        return exc
    text = str(exc).lower()
    gz = isinstance(exc, (EOFError, zlib.error)) or "gzip" in text or "compressed" in text
    known = isinstance(exc, (EOFError, zlib.error, OSError, ValueError))
    kind = "truncated or corrupt gzip stream" if known and gz else "unreadable NIfTI"
    return NiftiReadError(f"{path}: {kind} ({type(exc).__name__}: {exc})")


SLAB_VOXELS = 1 << 22
"""Voxels per slab when a volume is read slab by slab (:meth:`NiftiFile.slabs`; bounds the temporaries)."""


@dataclass
class NiftiFile:
    """An opened NIfTI file whose header has been checked: 3D (or 4D with one frame), positive
    finite spacing. The voxels are read by :meth:`read` (whole, as stored) or :meth:`slabs`."""

    path: Path
    image: nib.Nifti1Image
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(self.image.get_data_dtype())

    @property
    def scaled(self) -> bool:
        """True when the header's scl_slope/scl_inter change the stored values."""
        slope, inter = (getattr(self.image.dataobj, a, None) for a in ("slope", "inter"))
        return not ((slope is None or slope == 1) and (inter is None or inter == 0))

    def read(self) -> np.ndarray:
        """All voxels, file order, as nibabel gives them (scaled data as float64)."""
        try:
            data = np.asanyarray(self.image.dataobj)
        except Exception as exc:  # nibabel/gzip raise assorted errors on damaged files
            raise _read_error(self.path, exc) from exc
        return data[..., 0] if data.ndim == 4 else data

    def slabs(self, max_voxels: int | None = None):
        """Yield ``(k0, k1, slab)`` along the file's last voxel axis (as :meth:`read` scales them),
        reading the file once, front to back; slabs of at most ``max_voxels`` (default
        :data:`SLAB_VOXELS`) voxels, at least one slice."""
        per = max(1, self.shape[0] * self.shape[1])
        step = max(1, int(SLAB_VOXELS if max_voxels is None else max_voxels) // per)
        four_d = len(self.image.shape) == 4
        for k0 in range(0, self.shape[2], step):
            k1 = min(self.shape[2], k0 + step)
            try:
                slab = self.image.dataobj[:, :, k0:k1, 0] if four_d else self.image.dataobj[:, :, k0:k1]
            except Exception as exc:  # truncated stream part way through
                raise _read_error(self.path, exc) from exc
            yield k0, k1, np.asarray(slab)

    def header_volume(self) -> Volume:
        """A stand-in :class:`Volume` with this file's grid and a zero-stride array (no voxel read):
        for the checks that need only the grid."""
        return Volume(np.broadcast_to(np.zeros((), np.uint8), self.shape), self.affine, self.affine, _RAS.copy(),
                      self.image.header.copy(), self.path)

    def volume(self, data: np.ndarray, canonical: bool = True) -> Volume:
        """A :class:`Volume` of ``data`` (file voxel order) with this file's geometry."""
        header = self.image.header.copy()
        if not canonical:
            return Volume(data, self.affine, self.affine, _RAS.copy(), header, self.path)
        ornt = orientations.io_orientation(self.affine)
        arr = to_canonical_order(data, ornt)  # a view (no copy); np.ascontiguousarray it if needed
        can_affine = self.affine @ orientations.inv_ornt_aff(orientations.ornt_transform(ornt, _RAS), data.shape)
        return Volume(arr, can_affine, self.affine, ornt, header, self.path)


def open_nifti(path: str | Path) -> NiftiFile:
    """Open a NIfTI file and check its header (no voxel read yet).

    Raises:
        NiftiReadError: missing file, unreadable header, not 3D, or no usable spacing; the
            message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise NiftiReadError(f"{path}: file not found")
    try:
        img = nib.load(str(path), keep_file_open=True)
        shape = tuple(int(n) for n in img.shape)
    except Exception as exc:  # nibabel raises assorted errors on damaged headers
        raise _read_error(path, exc) from exc
    raw_pixdim = _raw_pixdim(path)
    if raw_pixdim is not None and not (np.all(np.isfinite(raw_pixdim)) and np.all(raw_pixdim > 0)):
        # nibabel silently replaces zero pixdims by 1 mm; a missing spacing must not pass unseen
        raise NiftiReadError(f"{path}: missing or invalid voxel spacing (pixdim {raw_pixdim.tolist()})")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NiftiReadError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    sp = spacing_from_affine(affine)
    if not all(np.isfinite(sp)) or min(sp) <= 0:
        raise NiftiReadError(f"{path}: missing or invalid voxel spacing {sp}")
    return NiftiFile(path, img, shape, affine)


def load_volume(path: str | Path, canonical: bool = True, dtype=None) -> Volume:
    """Load a NIfTI image or mask with its values as stored (scaled data as float64).

    For the hot paths use :func:`load_ct` (int16 or float32) and :func:`lib.io.load_mask`
    (the smallest integer type), which read slab by slab and never hold a float64 copy.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        canonical: reorient voxel axes to RAS+ (permute/flip only).
        dtype: optional dtype to cast to.

    Raises:
        NiftiReadError: missing, truncated or corrupt file, or no usable spacing; the
            message names the file.
    """
    f = open_nifti(path)
    data = f.read()
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return f.volume(data, canonical)


_INT16 = np.iinfo(np.int16)


def _exact_int16(f: NiftiFile) -> bool:
    """Whether every value the header can give fits int16 exactly (integer slope and intercept)."""
    dt = f.stored_dtype
    if not np.issubdtype(dt, np.integer):
        return False
    slope, inter = (getattr(f.image.dataobj, a, None) for a in ("slope", "inter"))
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if slope != round(slope) or inter != round(inter):
        return False
    info = np.iinfo(dt)
    ends = [info.min * slope + inter, info.max * slope + inter]
    return _INT16.min <= min(ends) and max(ends) <= _INT16.max


def load_ct(path: str | Path, canonical: bool = True) -> Volume:
    """Load a CT in HU as int16 when the stored values are exactly int16 after the header's
    scaling, else float32; read slab by slab, so no float64 copy of the volume ever exists.

    Values an int16 range could not hold exactly (a uint16 file with an intercept whose stored
    range exceeds int16, float data) come back as float32; ``meta["stored_dtype"]`` says what
    the file holds.

    Raises:
        NiftiReadError: as :func:`load_volume`.
    """
    f = open_nifti(path)
    if not f.scaled and f.stored_dtype in (np.int16, np.int8, np.uint8):
        data = f.read().astype(np.int16, copy=False)
    else:
        out_dtype = np.int16 if _exact_int16(f) else np.float32
        data = np.empty(f.shape, dtype=out_dtype, order="F")
        for k0, k1, slab in f.slabs():
            data[:, :, k0:k1] = slab
    vol = f.volume(data, canonical)
    vol.meta["stored_dtype"] = str(f.stored_dtype)
    return vol


def nifti_bytes(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None,
                compress: bool = True, descrip: str = "", aux_file: str = "", extension_text: str = "",
                xform_codes: tuple[int, int] = (1, 1)) -> bytes:
    """A NIfTI-1 file as bytes: the one encoder behind every NIfTI the workspace writes.

    The header's sform and qform are both set to ``affine`` with ``xform_codes`` = (sform code,
    qform code), by default (1, 1) (scanner), units mm; only
    geometry/dtype fields are carried over from ``header``, never its free-text fields. Text
    (``descrip``, ``aux_file``, a comment extension) is written only when passed explicitly:
    the synthetic sources plant identifiers that way, and curation with de-identification off
    copies source text (what the PHI audit must catch). Compressed output is deterministic:
    the same array, affine and text give the same bytes (gzip mtime 0, no file name).
    """
    arr = np.asarray(array)
    hdr = nib.Nifti1Header()
    if header is not None:
        hdr.set_xyzt_units(*header.get_xyzt_units())
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_sform(affine, code=int(xform_codes[0]))
    img.set_qform(affine, code=int(xform_codes[1]))
    img.header.set_data_dtype(arr.dtype)
    img.header["descrip"] = descrip.encode("latin-1", "replace")[:79]
    img.header["aux_file"] = aux_file.encode("latin-1", "replace")[:23]
    img.header.set_xyzt_units("mm", "sec")
    if extension_text:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, extension_text.encode("utf-8")))  # 6: comment
    data = img.to_bytes()
    if compress:
        data = _igzip.compress(data, compresslevel=1, mtime=0) if _igzip is not None else \
            gzip.compress(data, compresslevel=1, mtime=0)
    return data


def save_volume(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=None,
                header: nib.Nifti1Header | None = None, xform_codes: tuple[int, int] = (1, 1), **text: str) -> Path:
    """Atomically save ``array`` with ``affine`` as NIfTI (compressed when the name ends ``.gz``).

    Encoded by :func:`nifti_bytes` (sform = qform = ``affine``, codes ``xform_codes``, default 1;
    no free-text header fields unless ``descrip`` / ``aux_file`` / ``extension_text`` are given).
    """
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    data = nifti_bytes(arr, affine, header, compress=str(path).endswith(".gz"), xform_codes=xform_codes, **text)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def xform_codes_of(header: nib.Nifti1Header | None) -> tuple[int, int]:
    """``(sform code, qform code)`` of a NIfTI header; (1, 1) when it has neither (no header, or
    both codes 0: the affine then came from the voxel sizes alone and is written as scanner)."""
    if header is None or "sform_code" not in header:
        return (1, 1)
    codes = (int(header["sform_code"]), int(header["qform_code"]))
    return codes if any(codes) else (1, 1)


def save_like(array: np.ndarray, ref: Volume, path: str | Path, dtype=None) -> Path:
    """Save an array in ``ref``'s canonical order back in ``ref``'s original order and affine,
    with ``ref``'s sform / qform codes (a prediction keeps its input's, e.g. sform 2, qform 0)."""
    if tuple(array.shape) != ref.shape:
        raise ValueError(f"{path}: array shape {array.shape} differs from reference {ref.shape} ({ref.path})")
    return save_volume(ref.to_original(array), ref.original_affine, path, dtype=dtype, header=ref.header,
                       xform_codes=xform_codes_of(ref.header))


