"""lib.stages.annotation.ledger: duplicates refused."""

from __future__ import annotations

import sqlite3

import pytest

from lib.stages.annotation.ledger import ENTRY_COLUMNS, Ledger


def test_ledger_refuses_duplicates(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        led.enqueue(["a"], ["trainset"])
        row = dict.fromkeys(ENTRY_COLUMNS, 0) | {"case_id": "a", "round": 1, "tier": "junior", "actor": "j",
                                                     "started_at": "t", "finished_at": "t", "variant": "", "note": ""}
        led.record_case("a", 1, [row], "m", 0.5)
        with pytest.raises(sqlite3.IntegrityError):
            led.record_case("a", 1, [row], "m", 0.5)
        assert len(led.entries()) == 1
        assert led.accepted() == ["a"]
