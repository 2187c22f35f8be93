"""The PHI audit: every identifying value of the sources, searched for in every output file.

Every output file's bytes (decompressed ``.gz`` and zip members included) and every output file
name are searched; the stage fails when one is found. The report masks the values it found.
"""

from __future__ import annotations

import gzip
import io as _pyio
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

try:  # python-isal: a faster gzip (a declared dependency)
    from isal import igzip
except ImportError:  # pragma: no cover
    igzip = None
import numpy as np
from pydicom.multival import MultiValue
from tqdm.auto import tqdm

from lib.datasets.ctspine1k.ids import (
    DICOM_SOURCES,
    SOURCES,
)
from lib.datasets.ctspine1k.source_layout import source_folder
from lib.io import dicom_read as dicom

#: Keywords whose values identify a patient, a visit, a place or a person (DICOM PS3.15
#: basic profile, the subset that CT headers carry). Every PN (person name) and DA/DT (date)
#: element is identifying too, wherever it sits. PatientID is the public archive ID used as
#: release ID, and UIDs are kept: both are allowed.
PHI_KEYWORDS = frozenset({
    "PatientName", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName",
    "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber", "IssuerOfPatientID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "PerformedProcedureStepID",
    "RequestedProcedureID", "PatientComments", "AdditionalPatientHistory", "ImageComments",
    "Occupation", "MilitaryRank", "BranchOfService", "RegionOfResidence", "CountryOfResidence",
    "PatientInsurancePlanCodeSequence", "ScheduledProcedureStepID", "PerformedProcedureStepDescription",
})


@dataclass(frozen=True)
class Identifier:
    """An identifying value found in the sources (kept in memory only, never written).

    Attributes:
        kind: where it came from (DICOM keyword, ``folder_name``, ``nifti_descrip`` ...).
        value: the text as found.
        needles: lower-case byte strings searched for (the value and its variants: name
            parts, other date spellings), each with a boundary rule: ``"none"`` (substring),
            ``"word"`` (not inside a longer alphanumeric run), ``"digits"`` (not inside a
            longer digit run).
    """

    kind: str
    value: str
    needles: tuple[tuple[bytes, str], ...]


def _date_variants(d: str) -> list[str]:
    y, m, dd = d[:4], d[4:6], d[6:8]
    return [d, f"{y}-{m}-{dd}", f"{m}-{dd}-{y}", f"{dd}.{m}.{y}", f"{m}/{dd}/{y}", f"{dd}/{m}/{y}", f"{y}/{m}/{dd}"]


def make_identifier(kind: str, value: str, vr: str = "LO") -> Identifier | None:
    """Identifier with its search variants, or None when too short/generic to audit.

    Rules: dates (``DA``, 8 digits) in seven spellings, digit-bounded; times (``TM``) of 6+
    digits, digit-bounded; person names (``PN``) whole (``^`` as given, and as spaces) plus
    every name part of 5+ characters, word-bounded; other text whole (4+ characters) plus every
    word of 5+ characters that mixes letters and digits (planted tokens, MRNs), word-bounded.
    """
    value = str(value).strip().strip("\0").strip()
    if len(value) < 4:
        return None
    needles: list[tuple[str, str]] = []
    if vr == "DA" and re.fullmatch(r"\d{8}", value):
        needles = [(v, "digits") for v in _date_variants(value)]
    elif vr == "DT" and re.match(r"\d{8}", value):
        needles = [(v, "digits") for v in _date_variants(value[:8])] + [(value, "none")]
    elif vr == "TM":
        digits = value.split(".")[0]
        if len(digits) < 6 or not digits.isdigit():
            return None
        needles = [(digits, "digits"), (f"{digits[:2]}:{digits[2:4]}:{digits[4:6]}", "digits")]
    elif vr == "PN":
        needles = [(value, "none"), (value.replace("^", " ").strip(), "none")]
        needles += [(part, "word") for part in re.split(r"[\^\s]+", value) if len(part) >= 5]
    else:
        needles = [(value, "none")]
        needles += [(w, "word") for w in re.findall(r"[A-Za-z0-9]+", value)
                    if len(w) >= 5 and re.search(r"\d", w) and re.search(r"[A-Za-z]", w)]
    out: list[tuple[bytes, str]] = []
    for text, rule in needles:
        for enc in ("utf-8", "latin-1"):
            try:
                b = text.lower().encode(enc)
            except UnicodeEncodeError:
                continue
            if (b, rule) not in out and len(b) >= 4:
                out.append((b, rule))
    return Identifier(kind, value, tuple(out)) if out else None


def _walk_identifying(ds, out: dict[tuple[str, str], Identifier]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                _walk_identifying(item, out)
            continue
        kw = elem.keyword or ""
        if kw in ("PatientID",) or elem.VR == "UI":
            continue
        if kw in PHI_KEYWORDS or elem.VR in ("PN", "DA", "DT"):
            vals = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
            for v in vals:
                if v is None:
                    continue
                key = (kw or str(elem.tag), str(v))
                if key not in out:
                    ident = make_identifier(kw or str(elem.tag), str(v), elem.VR)
                    if ident is not None:
                        out[key] = ident


def collect_identifiers(sources_dir: str | Path, sources: Sequence[str] = SOURCES, every_file: bool = True,
                        progress: bool = False) -> list[Identifier]:
    """Every identifying value present in the sources, for the PHI audit.

    DICOM: all elements named in :data:`PHI_KEYWORDS` and every PN/DA/DT element (sequences
    included) of every file (``every_file``) or of the first, middle and last file of each
    series (identifying tags are series-level attributes; reading every header costs ~3 ms a
    file);
    the study and series folder names (they carry dates and descriptions). NIfTI: the free-text
    header fields ``descrip``, ``aux_file``, ``intent_name`` and extension contents.
    PatientID (the public archive ID used as release ID) and UIDs are not identifiers here.
    """
    root = Path(sources_dir)
    found: dict[tuple[str, str], Identifier] = {}
    for src in sources:
        base = source_folder(root, src)  # the MSD task may sit in Task03_Liver/ (as unpacked) or MSD_T10/
        if base is None:
            continue
        if src in DICOM_SOURCES:
            folders = sorted({p.parent for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")})
            for folder in tqdm(folders, desc=f"identifiers {src}", disable=not progress, leave=False):
                files = dicom.list_dicom_files(folder)
                if not files:
                    continue
                pick = files if every_file else sorted({files[0], files[len(files) // 2], files[-1]})
                for f in pick:
                    try:
                        ds = dicom.read_dataset(f, pixels=False)
                    except dicom.SeriesError:
                        continue
                    _walk_identifying(ds, found)
                rel = folder.relative_to(base).parts
                for name in rel[1:]:  # study / series folder names (not the public patient ID)
                    ident = make_identifier("folder_name", name)
                    if ident is not None:
                        found.setdefault(("folder_name", name), ident)
        else:
            for f in sorted(base.rglob("*.nii*")):
                try:
                    hdr = nib.load(str(f)).header
                except Exception:
                    continue
                texts = {"nifti_descrip": hdr["descrip"].tobytes(), "nifti_aux_file": hdr["aux_file"].tobytes(),
                         "nifti_intent_name": hdr["intent_name"].tobytes()}
                for i, e in enumerate(hdr.extensions):
                    c = e.get_content()
                    texts[f"nifti_extension_{i}"] = c if isinstance(c, bytes) else str(c).encode()
                for kind, raw in texts.items():
                    text = raw.split(b"\0")[0].decode("latin-1").strip()
                    ident = make_identifier(kind, text)
                    if ident is not None:
                        found.setdefault((kind, text), ident)
    return list(found.values())


@dataclass(frozen=True)
class Leak:
    """An identifier found in an output: file, where in it, which kind (value masked)."""

    path: str
    where: str
    kind: str
    masked: str

    def __str__(self) -> str:
        return f"{self.path} [{self.where}]: {self.kind} value {self.masked}"


class PHILeakError(RuntimeError):
    """Raised by :func:`require_no_phi` with every leak found."""

    def __init__(self, leaks: Sequence[Leak]):
        self.leaks = list(leaks)
        head = "\n".join(f"  - {x}" for x in self.leaks[:20])
        more = f"\n  ... and {len(self.leaks) - 20} more" if len(self.leaks) > 20 else ""
        super().__init__(f"PHI audit failed: {len(self.leaks)} identifying value(s) found in outputs:\n{head}{more}")


def _mask_value(v: str) -> str:
    return f"{v[:2]}***({len(v)} chars)"


_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{4,}")


def _bounded(text: bytes, needle: bytes, rule: str) -> bool:
    if rule == "none":
        return needle in text
    start = text.find(needle)
    cls = rb"[0-9]" if rule == "digits" else rb"[0-9a-z]"
    while start >= 0:
        end = start + len(needle)
        before = text[start - 1: start] if start else b""
        after = text[end: end + 1]
        if not (before and re.match(cls, before)) and not (after and re.match(cls, after)):
            return True
        start = text.find(needle, start + 1)
    return False


def _gzip_header_text(raw: bytes) -> bytes:
    """FNAME / FCOMMENT fields of a gzip header (plain text before the compressed stream)."""
    if len(raw) < 10:
        return b""
    flags, pos, out = raw[3], 10, []
    if flags & 4 and len(raw) >= 12:  # FEXTRA
        pos += 2 + int.from_bytes(raw[10:12], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT
        if flags & bit:
            end = raw.find(b"\0", pos)
            if end < 0:
                break
            out.append(raw[pos:end])
            pos = end + 1
    return b"\n".join(out)


def _png_text(raw: bytes) -> bytes:
    """Text chunks (tEXt, iTXt, zTXt) of a PNG; image data is not text."""
    out, pos = [], 8
    while pos + 8 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        kind = raw[pos + 4:pos + 8]
        data = raw[pos + 8:pos + 8 + n]
        if kind in (b"tEXt", b"iTXt"):
            out.append(data)
        elif kind == b"zTXt":
            key, _, rest = data.partition(b"\0")
            try:
                out.append(key + b" " + zlib.decompress(rest[1:]))
            except zlib.error:
                out.append(key)
        pos += 12 + n
    return b"\n".join(out)


def _gunzip(raw: bytes) -> bytes:
    return igzip.decompress(raw) if igzip is not None else gzip.decompress(raw)


def _nifti_views(body: bytes, label: str) -> list[tuple[str, bytes]]:
    """Views of a (decompressed) NIfTI-1 file: the header and extensions always; the voxel
    bytes only when they contain a run of four text bytes (what the audit searches), checked
    on every byte with numpy. CT in HU and label maps never do (a 16-bit value in
    [-1024, 3071] has a non-printable upper byte), so their voxels are proven free of text
    without a slow text scan."""
    if len(body) < 352 or body[344:348] not in (b"n+1\0", b"ni1\0") or int.from_bytes(body[:4], "little") != 348:
        return [(label, body)]
    vox_offset = int(np.frombuffer(body[108:112], "<f4")[0])
    if vox_offset < 348 or vox_offset > len(body):
        return [(f"{label} (NIfTI)", body)]
    header = body[:vox_offset]
    b = np.frombuffer(body, dtype=np.uint8, offset=vox_offset)
    if b.size < 4:
        return [(f"{label} NIfTI header", header)]
    code = int.from_bytes(body[70:72], "little")
    n_even = (len(body) - vox_offset) // 2 * 2
    if code == 4 and n_even:  # int16: a printable byte pair needs an upper byte 0x20..0x7E
        if int(np.frombuffer(body, "<i2", count=n_even // 2, offset=vox_offset).max()) < 0x2000:
            return [(f"{label} NIfTI header", header)]
    elif code in (2, 256) and int(b.max()) < 0x20 and (code == 2 or int(b.min()) >= 0):  # uint8/int8 labels
        return [(f"{label} NIfTI header", header)]
    p = (b >= 0x20) & (b <= 0x7E)
    run4 = p[:-3] & p[1:-2] & p[2:-1] & p[3:]
    if run4.any():
        return [(f"{label} NIfTI header", header), (f"{label} NIfTI voxels", body[vox_offset:])]
    return [(f"{label} NIfTI header", header)]


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """Byte views of a file to search: gzip -> header text + decompressed stream; zip
    (``.xlsx``) -> member names + every member; PNG -> text chunks; anything else -> raw bytes.
    Compressed payloads are never searched as raw bytes (random bytes, no text)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            body = _gunzip(raw)
        except (OSError, EOFError, zlib.error):
            body = b""
        return [("gzip header", _gzip_header_text(raw)), *_nifti_views(body, "gunzipped")]
    if len(raw) >= 348 and raw[344:348] in (b"n+1\0", b"ni1\0"):
        return _nifti_views(raw, "bytes")
    if raw[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(_pyio.BytesIO(raw)) as z:
                infos = z.infolist()
                views = [("zip member names", "\n".join(i.filename for i in infos).encode("utf-8"))]
                views += [(f"zip member {i.filename}", z.read(i)) for i in infos]
                return views
        except zipfile.BadZipFile:
            return [("bytes", raw)]
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return [("png text", _png_text(raw))]
    return [("bytes", raw)]


def _searchable(data: bytes) -> tuple[bytes, bytes]:
    """(lower-cased printable runs joined by newlines, lower-cased full data for non-ASCII
    needles). Binary payloads (voxels) shrink to their few text runs."""
    runs = b"\n".join(_PRINTABLE_RUN.findall(data)).lower()
    return runs, data


def audit_phi(roots: Sequence[str | Path], identifiers: Sequence[Identifier]) -> list[Leak]:
    """Search every file under ``roots`` (names and bytes) for the identifiers.

    Content views: raw bytes, gunzipped ``.gz``, zip members (``.xlsx``). ASCII needles are
    matched case-insensitively within printable runs; non-ASCII needles (latin-1/UTF-8
    names) byte-exactly in the whole data. Voxel data of CT/masks cannot hide text (16-bit HU
    in [-1024, 3071] never forms two printable bytes in a row).

    Returns:
        Every leak, with the value masked (the report itself must not leak).
    """
    leaks: list[Leak] = []
    ascii_n = [(i, n, r) for i in identifiers for n, r in i.needles if n.isascii()]
    other_n = [(i, n, r) for i in identifiers for n, r in i.needles if not n.isascii()]
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = str(f.relative_to(root.parent if root.is_file() else root))
            name = rel.lower().encode("utf-8")
            seen: set[tuple[str, str]] = set()
            for ident, n, r in ascii_n:
                if (ident.kind, ident.value) not in seen and _bounded(name, n, r):
                    seen.add((ident.kind, ident.value))
                    leaks.append(Leak(str(f), "file name", ident.kind, _mask_value(ident.value)))
            for where, data in _contents(f):
                text, full = _searchable(data)
                for ident, n, r in ascii_n:
                    if (ident.kind, ident.value) in seen:
                        continue
                    if n in text and _bounded(text, n, r):
                        seen.add((ident.kind, ident.value))
                        leaks.append(Leak(str(f), where, ident.kind, _mask_value(ident.value)))
                for ident, n, _r in other_n:
                    if (ident.kind, ident.value) not in seen and (n in full or n in full.lower()):
                        seen.add((ident.kind, ident.value))
                        leaks.append(Leak(str(f), where, ident.kind, _mask_value(ident.value)))
    return leaks


@dataclass
class AuditReport:
    """Outcome of a PHI audit."""

    files: int
    identifiers: int
    leaks: list[Leak]

    @property
    def passed(self) -> bool:
        return not self.leaks

    def summary(self) -> str:
        return (f"PHI audit: {self.files} output files and their names searched for {self.identifiers} identifying "
                f"values from the sources: " + ("no leak" if self.passed else f"{len(self.leaks)} LEAK(S)"))


def require_no_phi(roots: Sequence[str | Path], identifiers: Sequence[Identifier], raise_on_leak: bool = True
                   ) -> AuditReport:
    """Run :func:`audit_phi`; raise :class:`PHILeakError` on any leak (the stage fails)."""
    leaks = audit_phi(roots, identifiers)
    n = sum(1 if Path(r).is_file() else sum(1 for p in Path(r).rglob("*") if p.is_file())
            for r in roots if Path(r).exists())
    rep = AuditReport(n, len(identifiers), leaks)
    if leaks and raise_on_leak:
        raise PHILeakError(leaks)
    return rep
