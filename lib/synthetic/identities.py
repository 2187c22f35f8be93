"""Fake patient identities planted in the synthetic sources (names, dates, places, tokens).

They are what a real archive's headers carry and what curation's de-identification and PHI
audit must remove: every planted value is listed in the oracle's ``phi_planted.json``.
"""

from __future__ import annotations

import datetime as _dt

_SURNAMES = ("MILLER", "GARCIA", "NGUYEN", "SMITH", "KOWALSKI", "MUELLER", "ROSSI", "TANAKA", "DUBOIS",
             "OKAFOR", "LINDQVIST", "HASSAN", "NOVAK", "SILVA", "MURPHY", "PETROV")


_GIVEN = ("ANNA", "JAMES", "MARIA", "WEI", "FATIMA", "PETER", "LUCIA", "OMAR", "HELEN", "JOHN", "SOFIA", "RAJ")


_CITIES = ("SPRINGFIELD", "RIVERTON", "LAKEWOOD", "FAIRVIEW", "MAPLETON", "GREENVILLE")


_SCANNERS = (("SIEMENS", "SOMATOM Definition AS+", "B30f"), ("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD"),
             ("TOSHIBA", "Aquilion ONE", "FC03"), ("Philips", "Brilliance 64", "B"))


_TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def fake_token(rng) -> str:
    return "".join(rng.choice(list(_TOKEN_ALPHABET), 6))


def fake_date(rng, y0: int, y1: int) -> str:
    y = int(rng.integers(y0, y1 + 1))
    return f"{y:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def shift_date(date: str, days: int) -> str:
    d = _dt.date(int(date[:4]), int(date[4:6]), int(date[6:])) + _dt.timedelta(days=days)
    return d.strftime("%Y%m%d")


def fake_identity(rng, source: str, age_range: tuple[int, int], years: tuple[int, int]) -> dict:
    """Identifying and descriptive DICOM tags of one synthetic patient, with planted tokens."""
    tok = fake_token(rng)
    sex = str(rng.choice(["F", "M"]))
    study_date = fake_date(rng, *years)
    age = int(rng.integers(age_range[0], age_range[1] + 1))
    birth = shift_date(study_date, -int(age * 365.25 + rng.integers(0, 300)))
    man, model, kernel = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
    city = str(rng.choice(_CITIES))
    return {
        "token": tok,
        "PatientName": f"{rng.choice(_SURNAMES)}{tok}^{rng.choice(_GIVEN)}",
        "OtherPatientIDs": f"MRN{tok}{int(rng.integers(1000, 9999))}",
        "PatientBirthDate": birth,
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "InstitutionName": f"{city} GENERAL HOSPITAL {tok}",
        "InstitutionAddress": f"{int(rng.integers(1, 999))} MAIN ST {tok} {city}",
        "ReferringPhysicianName": f"DR{tok}^{rng.choice(_GIVEN)}",
        "OperatorsName": f"TECH{tok}",
        "StationName": f"CT{tok}",
        "DeviceSerialNumber": f"SN{tok}{int(rng.integers(100, 999))}",
        "AccessionNumber": f"A{tok}{int(rng.integers(10000, 99999))}",
        "StudyID": f"S{tok}",
        "StudyDate": study_date,
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "Manufacturer": man,
        "ManufacturerModelName": model,
        "ConvolutionKernel": kernel,
        "KVP": str(int(rng.choice([100, 120, 120, 140]))),
        "XRayTubeCurrent": int(rng.integers(80, 400)),
    }


#: Tag keywords whose values identify a patient (written with planted tokens; audited).
PLANTED_PHI_KEYWORDS = ("PatientName", "OtherPatientIDs", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
                "ReferringPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber",
                "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                "StudyTime")
