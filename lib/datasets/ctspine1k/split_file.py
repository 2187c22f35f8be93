"""The official split file (``data_split.txt``) and the seeded, source-stratified split.

Format: lines ``trainset:``, ``test_public:``, ``test_private:``, each followed by one image
file name per line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from lib.core.paths import SPLITS
from lib.core.seeding import stable_rng
from lib.datasets.ctspine1k.ids import infer_source
from lib.datasets.paper_facts import PAPER_SPLIT_COUNTS
from lib.io.atomic import write_text
from lib.io.nifti import strip_nifti_suffix


def read_split_file(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """Read an official ``data_split.txt``: lines ``trainset:``, ``test_public:``,
    ``test_private:``, each followed by image file names.

    Tolerates blank lines, spaces, Windows line ends and a line where two file names ran
    together (``A.nii.gzB.nii.gz``, as in the published file), which is split and noted.

    Returns:
        ``({release_id: split}, notes)``.

    Raises:
        FileNotFoundError / ValueError: missing file; a name before any section header; an
        unknown section; an ID listed in two splits — naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split file not found")
    out: dict[str, str] = {}
    notes: list[str] = []
    split = None
    for n, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            name = line[:-1].strip()
            if name not in SPLITS:
                raise ValueError(f"{path}, line {n}: unknown section {line!r}; expected one of {[s + ':' for s in SPLITS]}")
            split = name
            continue
        if split is None:
            raise ValueError(f"{path}, line {n}: file name {line!r} before any 'trainset:' / 'test_public:' / 'test_private:' line")
        names = [x + ".nii.gz" for x in line.split(".nii.gz") if x] if line.count(".nii.gz") > 1 else [line]
        if len(names) > 1:
            notes.append(f"{path.name}, line {n}: {len(names)} file names ran together; read as {names}")
        for name in names:
            rid = strip_nifti_suffix(name)
            if rid in out and out[rid] != split:
                raise ValueError(f"{path}, line {n}: {rid} listed in both {out[rid]} and {split}")
            if rid in out:
                notes.append(f"{path.name}, line {n}: {rid} listed twice in {split}")
            out[rid] = split
    return out, notes


def write_split_file(path: str | Path, assignment: Mapping[str, str]) -> Path:
    """Write ``data_split.txt`` in the official format (sections in release order, names sorted
    within each, ``.nii.gz`` file names, a blank line between sections)."""
    blocks = []
    for s in SPLITS:
        names = sorted(f"{rid}.nii.gz" for rid, sp in assignment.items() if sp == s)
        blocks.append(f"{s}:\n" + "".join(n + "\n" for n in names))
    return write_text(path, "\n".join(blocks))


def paper_fractions(source: str) -> tuple[float, float, float]:
    """The paper's train/public/private proportions of a source (all sources pooled for an
    unknown one: 610/197/198)."""
    counts = PAPER_SPLIT_COUNTS.get(source)
    if counts is None:
        tot = [sum(PAPER_SPLIT_COUNTS[s][sp] for s in PAPER_SPLIT_COUNTS) for sp in SPLITS]
    else:
        tot = [counts[sp] for sp in SPLITS]
    return tuple(t / sum(tot) for t in tot)


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [n * f for f in fractions]
    base = [int(math.floor(r)) for r in raw]
    rest = n - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def split_stratified(ids: Sequence[str], seed: int, patterns: Mapping[str, Sequence[str]] | None = None,
                     fractions: Mapping[str, Sequence[float]] | None = None) -> dict[str, str]:
    """Seeded split stratified by source with the paper's proportions per source.

    Within each source the IDs are sorted, permuted by a generator seeded with (seed, source)
    and cut by largest-remainder counts, so the same seed and IDs give the same split, and
    adding a source does not reshuffle the others. IDs of unknown spelling form their own
    stratum with the pooled proportions.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for rid in ids:
        groups[infer_source(rid, patterns)].append(rid)
    out: dict[str, str] = {}
    for src, members in groups.items():
        members = sorted(members)
        fr = (fractions or {}).get(src) or paper_fractions(src)
        counts = largest_remainder(len(members), fr)
        perm = stable_rng(seed, "split", src, nbytes=6).permutation(len(members))
        k = 0
        for split, c in zip(SPLITS, counts, strict=True):
            for i in perm[k:k + c]:
                out[members[int(i)]] = split
            k += c
    return out
