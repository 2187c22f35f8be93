"""Label description files for annotation tools: ITK-SNAP and 3D Slicer, from :mod:`lib.core.labels`."""

from __future__ import annotations

from pathlib import Path

from lib.core.labels import LABELS, ordered
from lib.io.atomic import atomic_write


def write_itksnap_labels(path: str | Path, values=None) -> Path:
    """Write an ITK-SNAP label description file (``label_description.txt`` format).

    Columns: IDX R G B A VIS MSH LABEL. Label 0 is "Clear Label" as ITK-SNAP expects.
    """
    values = ordered(values)
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    for v in values:
        lab = LABELS[v]
        r, g, b = lab.rgb
        lines.append(f'{v:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{lab.name}"')
    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_slicer_colortable(path: str | Path, values=None) -> Path:
    """Write a 3D Slicer colour table (``.ctbl``/``.txt``: ``value name R G B A`` per line)."""
    values = ordered(values)
    lines = ["# 3D Slicer colour table: spine1k vertebra labels", "0 background 0 0 0 0"]
    for v in values:
        lab = LABELS[v]
        lines.append(f"{v} {lab.name} {lab.rgb[0]} {lab.rgb[1]} {lab.rgb[2]} 255")
    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def read_itksnap_labels(path: str | Path) -> dict[int, str]:
    """Read an ITK-SNAP label description file into ``{value: name}`` (0 excluded)."""
    out: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition('"')
        idx = int(head.split()[0])
        if idx:
            out[idx] = rest.rstrip('"')
    return out
