"""State-change records: positional order (callers rely on it) and their JSON round trip."""

from __future__ import annotations

import pytest

from tolaria.contracts import Adaptation, SeedState, TransitionRecord

MOVE = (SeedState.DORMANT, SeedState.GERMINATED, "plateau", "low_rank")


@pytest.mark.parametrize(
    ("record", "first"),
    [(Adaptation("hidden.0.s1", *MOVE), "seed_id"), (TransitionRecord(4, *MOVE), "epoch")],
)
def test_first_field_then_the_move_and_json_round_trip(record, first):
    data = record.to_dict()
    assert list(data) == [first, "from_state", "to_state", "reason", "blueprint"]
    assert list(data.values())[1:] == ["dormant", "germinated", "plateau", "low_rank"]
    assert type(record).from_json(record.to_json()) == record
