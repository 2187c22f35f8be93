"""Release IDs: which source an ID comes from (a pattern table the user can extend).

IDs keep the sources' spellings: COLONOG ``1.3.6.1.4.1.9328.50.4.0xxx`` (or ``CTC-xxxxxxxxxx``),
HNSCC ``HN_Pxxx``, MSD T10 ``liver_xxx``, COVID-19 ``volume-covid19-A-0xxx_ct``. An ID that
matches no pattern is ``unknown``: reported by name and kept, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from lib.core.paths import SPLITS
from lib.io.nifti import strip_nifti_suffix

SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19")
"""The four CTSpine1K sources, in the paper's order."""


DICOM_SOURCES = ("COLONOG", "HNSCC")


NIFTI_SOURCES = ("MSD_T10", "COVID19")


UNKNOWN = "unknown"


BUILTIN_ID_PATTERNS: dict[str, tuple[str, ...]] = {
    "COLONOG": (r"1\.3\.6\.1\.4\.1\.9328\.50\.4\.\d{4}", r"CTC-\d{10}"),
    "HNSCC": (r"HN_P\d{3}",),
    "MSD_T10": (r"liver_\d+",),
    "COVID19": (r"volume-covid19-A-\d{4}(?:_\d+)?_ct",),
}
"""Release-ID spellings per source (full match). ``CTC-<10 digits>`` (COLONOG) and
``volume-covid19-A-0202_0_ct`` occur in the official release next to the usual spellings."""


def merge_id_patterns(extra: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The built-in release-ID pattern table with the user's patterns added.

    Args:
        extra: ``{source: regex or [regex, ...]}``; patterns of a known source are added to
            its built-in ones (not replacing them), a new source name adds a source.

    Raises:
        ValueError: a pattern that is not a valid regular expression, naming it.
    """
    table = {k: tuple(v) for k, v in BUILTIN_ID_PATTERNS.items()}
    for src, pats in (extra or {}).items():
        pats = (pats,) if isinstance(pats, str) else tuple(pats)
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"extra_id_patterns[{src!r}]: invalid regular expression {pat!r} ({exc})") from None
        table[src] = table.get(src, ()) + pats
    return table


def infer_source(release_id: str, patterns: Mapping[str, Sequence[str]] | None = None) -> str:
    """Source of a release ID by the pattern table (full match); ``"unknown"`` when none fits.

    ``.nii.gz`` / ``_seg`` suffixes are ignored, so file names work too.
    """
    rid = strip_nifti_suffix(release_id)
    if rid.endswith("_seg"):
        rid = rid[: -len("_seg")]
    for src, pats in (patterns or BUILTIN_ID_PATTERNS).items():
        if any(re.fullmatch(p, rid) for p in pats):
            return src
    return UNKNOWN


def release_id_for(source: str, key: str) -> str:
    """Release ID in the source's own spelling.

    COLONOG and HNSCC: the patient folder (the archive's public PatientID, e.g.
    ``1.3.6.1.4.1.9328.50.4.0001``, ``HN_P001``). MSD T10: the file stem (``liver_12``).
    COVID-19: the file stem with ``_ct`` (``volume-covid19-A-0014_ct``), as the release spells it.
    """
    if source == "COVID19" and not key.endswith("_ct"):
        return f"{key}_ct"
    return key


def count_by_source_split(assignment: Mapping[str, str], patterns: Mapping[str, Sequence[str]] | None = None
                          ) -> pd.DataFrame:
    """Per-source, per-split counts of a ``{release_id: split}`` map; unknown spellings are
    counted under ``unknown`` (and named by :func:`unknown_ids`)."""
    srcs = list(dict.fromkeys([*(patterns or BUILTIN_ID_PATTERNS), UNKNOWN]))
    tab = pd.DataFrame(0, index=srcs, columns=list(SPLITS), dtype=int)
    for rid, split in assignment.items():
        tab.loc[infer_source(rid, patterns), split] += 1
    tab = tab[(tab.sum(axis=1) > 0) | tab.index.isin(SOURCES)]
    tab.loc["total"] = tab.sum(axis=0)
    tab["all"] = tab[list(SPLITS)].sum(axis=1)
    tab.index.name = "source"
    return tab.reset_index()


def unknown_ids(ids: Iterable[str], patterns: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """IDs whose spelling matches no source pattern, sorted."""
    return sorted(strip_nifti_suffix(i) for i in ids if infer_source(i, patterns) == UNKNOWN)
