"""The plan of the synthetic sources: which volumes, patients, variants, grids and quirks.

:func:`plan_sources` turns the 00_sources parameters into picklable work items (nothing is
rendered); :func:`official_split` deals the release IDs into the split the synthetic release
ships as ``data_split.txt`` (the paper's per-source proportions, variants in every test split).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.paths import SPLITS
from lib.core.seeding import stable_rng, stable_seed
from lib.datasets.ctspine1k.ids import release_id_for
from lib.datasets.ctspine1k.split_file import write_split_file
from lib.datasets.paper_facts import PAPER_SPLIT_COUNTS
from lib.synthetic.identities import fake_identity, fake_token, shift_date
from lib.synthetic.phantom import CaseSpec

RAW_SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19", "VerSe")




CTSPINE1K_SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19")


def _choose_exact(rng, n: int, counts: dict) -> list:
    """Assign labels to n items with exact counts for the given keys (rest 'default')."""
    out = ["default"] * n
    order = list(rng.permutation(n))
    for key, c in counts.items():
        for _ in range(min(c, len(order))):
            out[order.pop()] = key
    return out


def _anatomy(r: np.random.Generator) -> dict:
    """Seeded anatomy of one patient (body scale, curvatures, scoliosis in mm, ribs, density);
    six draws from ``r``, in this order."""
    return dict(
        body_scale=float(np.clip(r.normal(1.05, 0.15), 0.8, 1.45)),
        lordosis=float(np.clip(r.normal(1.0, 0.18), 0.5, 1.5)),
        kyphosis=float(np.clip(r.normal(1.0, 0.18), 0.5, 1.6)),
        scoliosis_mm=float(r.uniform(5, 18)) if r.uniform() < 0.12 else 0.0,
        stump_ribs=bool(r.uniform() < 0.1),
        bone_density=float(r.uniform(0.7, 1.15)),
    )


def _noise(r: np.random.Generator, c: Mapping[str, object], lo_hi=None) -> float:
    """Noise level (HU) drawn uniformly in ``lo_hi`` (default ``c["noise_hu_range"]``)."""
    lo, hi = lo_hi or c["noise_hu_range"]
    return float(r.uniform(lo, hi))


def _lumbar_of(v: str) -> int:
    """Number of lumbar vertebrae of a lumbosacral variant label."""
    return {"L6": 6, "L5_missing": 4}.get(v, 5)


def _lumbosacral_labels(c: Mapping[str, object], rng: np.random.Generator) -> tuple[list, list]:
    """Variant and metal labels of the COLONOG + MSD cases (COLONOG first), drawn from the
    shared ``rng`` (variants, then metal)."""
    # ---- CTSpine1K sources: variants among the cases whose FOV holds the lumbosacral junction
    n_ls = int(c["n_colonog"]) + int(c["n_msd"])
    n_l6 = int(round(float(c["frac_l6"]) * n_ls))
    n_l5m = int(round(float(c["frac_l5_missing"]) * n_ls))
    n_tr = int(round(float(c["frac_transitional"]) * n_ls))
    ls_variant = _choose_exact(rng, n_ls, {"L6": n_l6, "L5_missing": n_l5m, "transitional": n_tr})
    n_metal = int(round(float(c["frac_metal"]) * n_ls))
    ls_metal = _choose_exact(rng, n_ls, {"metal": n_metal})
    return ls_variant, ls_metal


def _plan_colonog(c: Mapping[str, object], seed: int, ls_variant: list, ls_metal: list) -> list[dict]:
    """COLONOG: DICOM, two positions per patient; the low-quality cases (noise, missing
    slices) come after the ``n_colonog`` regular ones."""
    ip, n_col = float(c["inplane_mm"]), int(c["n_colonog"])
    low = ["noise"] * int(c["n_low_noise"]) + ["missing_slices"] * int(c["n_low_missing_slices"])
    items: list[dict] = []
    for i in range(n_col + len(low)):
        lowq = low[i - n_col] if i >= n_col else ""
        v = ls_variant[i] if i < n_col else "default"
        r = stable_rng(seed, "COLONOG", i)
        pid = f"1.3.6.1.4.1.9328.50.4.{i + 1:04d}"
        ident = fake_identity(r, "COLONOG", (50, 80), (2005, 2008))
        pseed = stable_seed(seed, "COLONOG-anatomy", i)
        an = _anatomy(r)
        study_desc = "CT COLONOGRAPHY SCREENING"
        study_folder = f"{ident['StudyDate'][4:6]}-{ident['StudyDate'][6:]}-{ident['StudyDate'][:4]}-Abdomen-{study_desc}-{int(r.integers(10000, 99999))}"
        for j, pos in enumerate(("supine", "prone")):
            sn = 2 + j
            spec = CaseSpec(seed=pseed, scan_seed=j, n_thoracic=12, n_lumbar=_lumbar_of(v),
                            sacralization=v == "transitional", fov="abdomen",
                            spacing_mm=(ip, ip, float(c["z_colonog_mm"])), noise_hu=_noise(r, c),
                            contrast_phase="native", metal=ls_metal[i] == "metal" if i < n_col else False,
                            colon_gas=True, position=pos, **an)
            if lowq == "noise":
                spec = replace(spec, noise_hu=float(c["low_noise_hu"]))
            items.append(dict(
                item_id=f"COLONOG/{pid}/{pos}", group=f"COLONOG/{pid}", source="COLONOG", patient_id=pid, fmt="dicom",
                spec=spec.to_dict(),
                time_point="", series_description=f"{pos.capitalize()} 1.0 {ident['ConvolutionKernel']}",
                study_folder=study_folder, series_folder=f"{sn}.000000-{pos.capitalize()}-{int(r.integers(10000, 99999))}",
                series_number=sn, study_description=study_desc, ident=ident, patient_position="HFS" if pos == "supine" else "HFP",
                slice_order=("descending", "ascending", "shuffled")[int(r.choice(3, p=[0.6, 0.3, 0.1]))],
                missing_slices=lowq == "missing_slices", quality="low" if lowq else "ok", quality_reason=lowq,
                body_part="ABDOMEN",
                variant=v if v != "default" else "normal"))
    return items


def _plan_hnscc(c: Mapping[str, object], seed: int) -> list[dict]:
    """HNSCC: DICOM, ``hnscc_time_points`` time points per patient, neck FOV."""
    ip = float(c["inplane_mm"])
    n_tp = int(c["hnscc_time_points"])
    items: list[dict] = []
    for i in range(int(c["n_hnscc"])):
        r = stable_rng(seed, "HNSCC", i)
        pid = f"HN_P{i + 1:03d}"
        ident = fake_identity(r, "HNSCC", (45, 78), (2003, 2012))
        pseed = stable_seed(seed, "HNSCC-anatomy", i)
        an = _anatomy(r)
        for tp in range(n_tp):
            date = shift_date(ident["StudyDate"], int(tp * r.integers(60, 120)))
            idt = dict(ident, StudyDate=date, AccessionNumber=f"A{ident['token']}{tp}{int(r.integers(1000, 9999))}")
            phase = "arterial" if r.uniform() < 0.5 else "native"
            spec = CaseSpec(seed=pseed, scan_seed=tp, fov="neck", spacing_mm=(ip, ip, float(c["z_hnscc_mm"])),
                            noise_hu=_noise(r, c), contrast_phase=phase, **an)
            desc = "CT NECK W CONTRAST" if phase != "native" else "CT NECK WO CONTRAST"
            items.append(dict(
                item_id=f"HNSCC/{pid}/tp{tp}", source="HNSCC", patient_id=pid, fmt="dicom", spec=spec.to_dict(),
                time_point=str(tp), series_description=f"NECK {float(c['z_hnscc_mm']):.1f} SOFT",
                study_folder=f"{date[4:6]}-{date[6:]}-{date[:4]}-{desc}-{int(r.integers(10000, 99999))}",
                series_folder=f"2.000000-NECK {float(c['z_hnscc_mm']):.1f}-{int(r.integers(10000, 99999))}",
                series_number=2, study_description=desc, ident=idt, patient_position="HFS",
                slice_order="descending" if r.uniform() < 0.8 else "shuffled", missing_slices=False,
                quality="ok", quality_reason="", body_part="NECK", variant="normal"))
    return items


def _plan_msd(c: Mapping[str, object], seed: int, ls_variant: list, ls_metal: list) -> list[dict]:
    """MSD T10: NIfTI, abdominal FOV, variable z; the low-quality (truncated FOV) cases come
    after the ``n_msd`` regular ones, whose labels follow COLONOG's in ``ls_variant``."""
    ip, n_col, n_msd = float(c["inplane_mm"]), int(c["n_colonog"]), int(c["n_msd"])
    low = ["truncated"] * int(c["n_low_truncated"])
    zc = np.asarray(c["z_msd_choices_mm"], float)
    zw = np.asarray(c["z_msd_weights"], float)
    zw = zw / zw.sum()
    used_ids = set()
    items: list[dict] = []
    for i in range(n_msd + len(low)):
        lowq = low[i - n_msd] if i >= n_msd else ""
        v = ls_variant[n_col + i] if i < n_msd else "default"
        r = stable_rng(seed, "MSD_T10", i)
        n = int(r.integers(0, 200))
        while n in used_ids:
            n = (n + 1) % 1000
        used_ids.add(n)
        stem = f"liver_{n}"
        z = float(r.choice(zc, p=zw))
        spec = CaseSpec(seed=stable_seed(seed, "MSD-anatomy", i), n_lumbar=_lumbar_of(v), sacralization=v == "transitional",
                        fov="abdomen", spacing_mm=(ip, ip, z), noise_hu=_noise(r, c), contrast_phase="portal",
                        metal=ls_metal[n_col + i] == "metal" if i < n_msd else False, **_anatomy(r))
        if lowq == "truncated":
            spec = replace(spec, fov_xy_mm=170.0, fov_center_offset_mm=(75.0, -45.0))
        items.append(dict(item_id=f"MSD_T10/{stem}", source="MSD_T10", patient_id=stem, fmt="nifti", spec=spec.to_dict(),
                          rel_path=f"MSD_T10/imagesTr/{stem}.nii.gz", axcodes=("L", "P", "S") if r.uniform() < 0.7 else ("R", "A", "S"),
                          descrip_token=fake_token(r) if r.uniform() < 0.35 else "", time_point="", series_description="",
                          quality="low" if lowq else "ok", quality_reason=lowq, variant=v if v != "default" else "normal"))
    return items


def _plan_covid(c: Mapping[str, object], seed: int) -> list[dict]:
    """COVID-19: NIfTI, chest FOV, thick slices (``z_covid_mm``)."""
    ip = float(c["inplane_mm"])
    items: list[dict] = []
    for i in range(int(c["n_covid"])):
        r = stable_rng(seed, "COVID19", i)
        stem = f"volume-covid19-A-0{(14 + i * 37) % 1000:03d}"
        z = float(c["z_covid_mm"])
        spec = CaseSpec(seed=stable_seed(seed, "COVID-anatomy", i), fov="chest", spacing_mm=(ip, ip, z),
                        slice_thickness_mm=z, noise_hu=_noise(r, c, c["covid_noise_hu_range"]), contrast_phase="native",
                        lung_opacity=float(r.uniform(0.1, 0.35)), **_anatomy(r))
        items.append(dict(item_id=f"COVID19/{stem}", source="COVID19", patient_id=stem, fmt="nifti", spec=spec.to_dict(),
                          rel_path=f"COVID19/{stem}.nii.gz", axcodes=("R", "A", "S") if r.uniform() < 0.5 else ("L", "P", "S"),
                          descrip_token=fake_token(r) if r.uniform() < 0.35 else "", time_point="", series_description="",
                          quality="ok", quality_reason="", variant="normal"))
    return items


def _verse_labels(c: Mapping[str, object], rng: np.random.Generator) -> tuple[list, list, list, list]:
    """Per VerSe subject: lumbar variant, thoracic variant, crop and mask-grid labels, drawn
    from the shared ``rng`` in that order; with 4 subjects or more each rare variant at least once."""
    n_v = int(c["n_verse"])
    counts = {"L6": int(round(float(c["verse_frac_l6"]) * n_v)), "L4": int(round(float(c["verse_frac_l4"]) * n_v))}
    tcounts = {"T11": int(round(float(c["verse_frac_t11"]) * n_v)), "T13": int(round(float(c["verse_frac_t13"]) * n_v))}
    if n_v >= 4:
        for k in counts:
            counts[k] = max(1, counts[k])
        for k in tcounts:
            tcounts[k] = max(1, tcounts[k])
    lv = _choose_exact(rng, n_v, counts)
    tv = _choose_exact(rng, n_v, tcounts)
    crop = _choose_exact(rng, n_v, {"crop": int(round(float(c["verse_frac_cropped"]) * n_v))})
    mdiff = _choose_exact(rng, n_v, {"diff": int(round(float(c["verse_frac_mask_spacing_differs"]) * n_v))})
    return lv, tv, crop, mdiff


def _plan_verse(c: Mapping[str, object], seed: int, rng: np.random.Generator) -> list[dict]:
    """VerSe: BIDS, complete and cropped scans, oversampled variants, some masks on another grid."""
    ip, n_v = float(c["inplane_mm"]), int(c["n_verse"])
    lv, tv, crop, mdiff = _verse_labels(c, rng)
    zv = float(c["z_verse_mm"])
    items: list[dict] = []
    for i in range(n_v):
        r = stable_rng(seed, "VerSe", i)
        sub = f"sub-verse{(i * 7 + 4) % 1000:03d}" if n_v < 140 else f"sub-verse{i:03d}"
        nl = {"L6": 6, "L4": 4}.get(lv[i], 5)
        nt = {"T11": 11, "T13": 13}.get(tv[i], 12)
        fov = "verse_crop" if crop[i] == "crop" else "whole"
        # complete scans are spine-centred reconstructions (VerSe's in-plane FOV is the spine
        # region, not the whole body); cropped ones cover a run of levels
        spec = CaseSpec(seed=stable_seed(seed, "VerSe-anatomy", i), n_thoracic=nt, n_lumbar=nl, fov=fov,
                        spacing_mm=(ip, ip, zv), noise_hu=_noise(r, c), contrast_phase=str(r.choice(["native", "portal"])),
                        metal=bool(r.uniform() < float(c["verse_frac_metal"])) and fov == "whole",
                        center_on_spine=fov == "whole", fov_xy_mm=float(c["verse_fov_xy_mm"]) if fov == "whole" else None,
                        **_anatomy(r))
        dir_ax = r.uniform() < 0.5
        stem = f"{sub}_dir-ax" if dir_ax else sub
        variant = "+".join([x for x in (lv[i], tv[i]) if x != "default"]) or "normal"
        items.append(dict(item_id=f"VerSe/{stem}", source="VerSe", patient_id=sub, fmt="verse", spec=spec.to_dict(),
                          rel_path=f"VerSe/rawdata/{sub}/{stem}_ct.nii.gz", stem=stem, subject=sub,
                          axcodes=tuple(str(a) for a in [("P", "I", "R"), ("L", "A", "S"), ("R", "P", "I"), ("R", "A", "S")][int(r.integers(4))]),
                          mask_zoom=(1.0, 1.0, 0.5) if mdiff[i] == "diff" else None, descrip_token="",
                          time_point="", series_description="complete" if fov == "whole" else "cropped",
                          quality="ok", quality_reason="", variant=variant))
    return items


def plan_sources(cfg: Mapping[str, object]) -> list[dict]:
    """Plan every synthetic source volume (no rendering): a list of picklable work items.

    Args:
        cfg: the 00_sources parameters (see ``params/<profile>/00_sources.yaml``): counts per
            source, grids, variant fractions, low-quality counts, seed.

    Returns:
        One dict per volume to write, in a stable order, each with ``item_id``, ``source``,
        ``patient_id``, ``spec`` (a :class:`lib.synthetic.phantom.CaseSpec` as dict) and the
        format-specific fields (folders, tags, slice order, orientation, quality flag).
    """
    c = dict(cfg)
    seed = int(c["seed"])
    # One shared generator for the cross-case labels; every case draws from its own seeded
    # generator. The planners run in this order so the shared draws keep their order.
    rng = np.random.default_rng([seed, 1000])
    ls_variant, ls_metal = _lumbosacral_labels(c, rng)
    items = _plan_colonog(c, seed, ls_variant, ls_metal)
    items += _plan_hnscc(c, seed)
    items += _plan_msd(c, seed, ls_variant, ls_metal)
    items += _plan_covid(c, seed)
    items += _plan_verse(c, seed, rng)
    return items


def official_split(index: pd.DataFrame, seed: int, min_per_test_split: dict[str, int] | None = None
                   ) -> dict[str, str]:
    """The synthetic release's official split (``{release_id: split}``), as CTSpine1K ships one.

    Per source, the paper's proportions (:data:`PAPER_SPLIT_COUNTS`). The generator knows the
    variants, and the real test splits hold the paper's L6 and lumbar-sacralisation cases, so
    variant patients are dealt to each test split first until it holds
    ``min_per_test_split`` of each (default 3 L6 and 2 missing L5, the failure analysis'
    minimum), within each source's test-slot counts; the rest is seeded and random. Only
    good-quality volumes are listed (a real release ships no discarded scan).
    """
    minimum = {"L6": 3, "L5_missing": 2} if min_per_test_split is None else dict(min_per_test_split)
    ok = index[(index["quality"] == "ok") & index["source"].isin(list(PAPER_SPLIT_COUNTS))]
    patients: dict[str, tuple[str, str]] = {}  # release id -> (source, variant)
    for r in ok.itertuples():
        key = r.patient_id if r.source in ("COLONOG", "HNSCC") else r.source_key
        patients.setdefault(release_id_for(r.source, str(key)), (r.source, str(r.variant)))
    rng = np.random.default_rng(seed)
    slots: dict[tuple[str, str], int] = {}
    for src, per_split in PAPER_SPLIT_COUNTS.items():
        counts = tuple(per_split[s] for s in SPLITS)
        n = sum(1 for s, _ in patients.values() if s == src)
        frac = np.asarray(counts, float) / sum(counts)
        pub, priv = int(round(n * frac[1])), int(round(n * frac[2]))
        slots[(src, "test_public")], slots[(src, "test_private")] = pub, priv
    assignment: dict[str, str] = {}
    for kind, need in minimum.items():
        cands = sorted(rid for rid, (_, v) in patients.items() if kind in v.split("+"))
        cands = [cands[i] for i in rng.permutation(len(cands))]
        for split in ("test_public", "test_private"):
            got = 0
            for rid in cands:
                src = patients[rid][0]
                if got >= need:
                    break
                if rid not in assignment and slots[(src, split)] > 0:
                    assignment[rid] = split
                    slots[(src, split)] -= 1
                    got += 1
    for src in PAPER_SPLIT_COUNTS:
        rest = sorted(rid for rid, (s, _) in patients.items() if s == src and rid not in assignment)
        rest = [rest[i] for i in rng.permutation(len(rest))]
        for rid in rest:
            for split in ("test_public", "test_private"):
                if slots[(src, split)] > 0:
                    assignment[rid] = split
                    slots[(src, split)] -= 1
                    break
            else:
                assignment[rid] = "trainset"
    return assignment


def write_official_split(path: Path, index: pd.DataFrame, seed: int) -> Path:
    """Write :func:`official_split` as ``data_split.txt`` in the release's official format."""
    return write_split_file(path, official_split(index, seed))
