"""lib.synthetic.source_plan: variants planted per profile and in every test split."""

from __future__ import annotations

import yaml

from lib.synthetic import source_plan
from tests.helpers.synthetic_sources import REPO


def test_synthetic_profile_plants_enough_variants():
    cfg = yaml.safe_load((REPO / "params" / "synthetic" / "00_sources.yaml").read_text())
    items = source_plan.plan_sources(cfg)
    ls = [i for i in items if i["source"] in ("COLONOG", "MSD_T10") and i["quality"] == "ok"]
    per_patient = {i["patient_id"]: i["variant"] for i in ls}
    n = len(per_patient)
    l6 = sum(v == "L6" for v in per_patient.values())
    l5 = sum(v == "L5_missing" for v in per_patient.values())
    # a 20 % test split of these patients holds >= 3 L6 and >= 2 missing-L5 on average
    assert 0.2 * l6 >= 2.5
    assert 0.2 * l5 >= 1.8
    assert 40 <= n <= 60
    assert all(i["spec"]["fov"] == "abdomen" for i in ls if i["variant"] != "normal")
    # CTSpine1K-source patients: about 60, every source >= 6, COLONOG the majority
    pats = {(i["source"], i["patient_id"]) for i in items if i["source"] != "VerSe"}
    counts = {s: sum(1 for x in pats if x[0] == s) for s in source_plan.CTSPINE1K_SOURCES}
    assert 50 <= sum(counts.values()) <= 70
    assert min(counts.values()) >= 6
    assert counts["COLONOG"] == max(counts.values())


def test_official_split_holds_the_variants_each_test_split_needs():
    import pandas as pd

    from lib.synthetic.source_plan import official_split

    rows = []
    for i in range(40):
        variant = "L6" if i % 4 == 0 else ("L5_missing" if i % 4 == 1 else "normal")
        rows.append(dict(source="COLONOG", patient_id=f"1.3.6.1.4.1.9328.50.4.{i:04d}", source_key=f"uid{i}",
                         quality="ok", variant=variant))
    rows += [dict(source="MSD_T10", patient_id=f"liver_{i}", source_key=f"liver_{i}", quality="ok",
                  variant="L6" if i < 2 else "normal") for i in range(12)]
    rows += [dict(source="COVID19", patient_id=f"c{i}", source_key=f"volume-covid19-A-{i:04d}", quality="ok",
                  variant="normal") for i in range(6)]
    rows.append(dict(source="COLONOG", patient_id="bad", source_key="uidbad", quality="low", variant="normal"))
    index = pd.DataFrame(rows)
    a = official_split(index, seed=0)
    assert "bad" not in a
    assert len(a) == 58
    assert a["volume-covid19-A-0000_ct"] in ("trainset", "test_public", "test_private")  # release spelling
    variant = {r.patient_id if r.source == "COLONOG" else (r.source_key + ("_ct" if r.source == "COVID19" else "")): r.variant
               for r in index.itertuples()}
    for split in ("test_public", "test_private"):
        ids = [k for k, s in a.items() if s == split]
        assert sum(variant[k] == "L6" for k in ids) >= 3
        assert sum(variant[k] == "L5_missing" for k in ids) >= 2
    colonog = [s for k, s in a.items() if k.startswith("1.3.6")]
    assert colonog.count("trainset") == 24
    assert colonog.count("test_public") == 8
    assert official_split(index, seed=0) == a
    assert official_split(index, seed=1) != a
