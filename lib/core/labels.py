"""The one table of vertebra labels: values, names, regions and colours.

CTSpine1K labels 1..7 = C1..C7, 8..19 = T1..T12, 20..25 = L1..L6. VerSe adds 28 = T13
(26 sacrum and 27 coccyx exist in the VerSe scheme but are not labelled in either data set).
Every table, plot and export in the workspace reads names, regions and colours from here.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    """One vertebra label.

    Attributes:
        value: integer stored in the mask.
        name: anatomical name, e.g. ``"L6"``.
        region: ``"cervical"``, ``"thoracic"`` or ``"lumbar"``.
        rgb: display colour, 0..255 per channel.
    """

    value: int
    name: str
    region: str
    rgb: tuple[int, int, int]


REGIONS: tuple[str, ...] = ("cervical", "thoracic", "lumbar")

# Hue bands per region so that neighbours differ and regions read at a glance.
_REGION_HUES = {"cervical": (0.55, 0.68), "thoracic": (0.25, 0.45), "lumbar": (0.78, 1.15)}


def _colour(region: str, index: int, count: int) -> tuple[int, int, int]:
    lo, hi = _REGION_HUES[region]
    hue = (lo + (hi - lo) * index / max(count - 1, 1)) % 1.0
    # alternate lightness so adjacent vertebrae are distinguishable in overlays
    light = 0.45 if index % 2 == 0 else 0.62
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
    return (round(r * 255), round(g * 255), round(b * 255))


def _build() -> dict[int, Label]:
    table: dict[int, Label] = {}
    specs = [("cervical", "C", 1, 7), ("thoracic", "T", 8, 12), ("lumbar", "L", 20, 6)]
    for region, prefix, start, count in specs:
        for i in range(count):
            value = start + i
            table[value] = Label(value, f"{prefix}{i + 1}", region, _colour(region, i, count))
    table[28] = Label(28, "T13", "thoracic", _colour("thoracic", 12, 13))
    return table


LABELS: dict[int, Label] = _build()
"""All labels by value, including VerSe's T13 (28)."""

CTSPINE1K_LABELS: tuple[int, ...] = tuple(range(1, 26))
"""The 25 labels of the CTSpine1K release (C1..L6)."""

VERSE_LABELS: tuple[int, ...] = CTSPINE1K_LABELS + (28,)
"""Labels that may appear in VerSe masks handled by this workspace (C1..L6, T13)."""

NAME_TO_VALUE: dict[str, int] = {lab.name: v for v, lab in LABELS.items()}

CERVICAL = tuple(v for v, lab in LABELS.items() if lab.region == "cervical")
THORACIC = tuple(v for v in range(8, 20))  # T1..T12 (T13 separately: 28)
LUMBAR = tuple(range(20, 26))
L5, L6, T12, T13 = 24, 25, 19, 28
C1, C2 = 1, 2


def name(value: int) -> str:
    """Name of a label value, e.g. ``name(25) == "L6"``.

    Raises:
        KeyError: for a value that is not a vertebra label, with the value in the message.
    """
    try:
        return LABELS[int(value)].name
    except KeyError:
        raise KeyError(f"{value} is not a vertebra label; known: {sorted(LABELS)}") from None


def value(label_name: str) -> int:
    """Label value of a vertebra name (``"L6"`` -> 25)."""
    try:
        return NAME_TO_VALUE[label_name]
    except KeyError:
        raise KeyError(f"{label_name!r} is not a vertebra name; known: {list(NAME_TO_VALUE)}") from None


def region(value: int) -> str:
    """Region (cervical/thoracic/lumbar) of a label value."""
    return LABELS[int(value)].region


def ordered(values=None) -> list[int]:
    """Label values in craniocaudal order (T13 between T12 and L1)."""
    vals = sorted(LABELS) if values is None else [int(v) for v in values]
    return sorted(vals, key=lambda v: 19.5 if v == T13 else v)


def level_index(value: int) -> float:
    """Craniocaudal level of a label: C1 = 0 ... T12 = 18, L1 = 19 ... L6 = 24; T13 (28) sits
    half-way between T12 and L1 (18.5) so that a spine without T13 shifts T12 <-> L1 directly."""
    value = int(value)
    if value == T13:
        return 18.5
    if value not in LABELS:
        raise ValueError(f"{value} is not a vertebra label")
    return float(value - 1)


def label_at_level(level: float) -> int:
    """Inverse of :func:`level_index` (0 outside C1..L6)."""
    if level == 18.5:
        return T13
    if float(level).is_integer() and 0 <= level <= 24:
        return int(level) + 1
    return 0


def parse_label_range(text: str) -> list[int]:
    """Parse ``"1-25"``, ``"1-7,20-25"``, ``"C1-L6"`` or ``"L6"`` into label values.

    Raises:
        ValueError: naming the part that is not a label or range.
    """
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (p.strip() for p in part.split("-", 1))
                lo = int(a) if a.isdigit() else value(a)
                hi = int(b) if b.isdigit() else value(b)
                out.extend(v for v in range(lo, hi + 1) if v in LABELS)
            else:
                out.append(int(part) if part.isdigit() else value(part))
        except KeyError as exc:
            raise ValueError(f"label range {text!r}: {part!r} is not a label ({exc})") from None
    unknown = [v for v in out if v not in LABELS]
    if unknown:
        raise ValueError(f"label range {text!r}: {unknown} are not vertebra labels")
    return sorted(dict.fromkeys(out))


def colour_lut(max_value: int = 28) -> list[tuple[float, float, float, float]]:
    """RGBA lookup table (0..1 floats) indexed by label value; 0 and unknown are transparent."""
    lut = [(0.0, 0.0, 0.0, 0.0)] * (max_value + 1)
    for v, lab in LABELS.items():
        if v <= max_value:
            lut[v] = (lab.rgb[0] / 255, lab.rgb[1] / 255, lab.rgb[2] / 255, 1.0)
    return lut


