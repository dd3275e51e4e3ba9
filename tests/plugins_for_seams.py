"""User code named in configs by the seam tests (``plugins_for_seams:...``)."""

from __future__ import annotations

from tolaria.contracts import SeedState
from tolaria.events import Callback
from tolaria.tamiyo import Decision, HeuristicPolicy


class EventRecorder(Callback):
    """Keeps every record it is given, batch ends included."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.records: list = []

    def on_event(self, trainer, record) -> None:
        self.records.append(record)

    def on_batch_end(self, trainer, record) -> None:
        self.records.append(record)


class PatientPolicy(HeuristicPolicy):
    """Grafts the first seed with options once it has counted ``wait`` epochs -- its own
    memory, which must survive a checkpoint round trip for a resumed run to decide alike."""

    def __init__(self, config, wait: int = 2) -> None:
        super().__init__(config)
        self.wait = wait
        self.epochs_seen = 0

    def decide(self, observation):
        if self.epochs_seen + 1 < self.wait:
            return []
        dormant = [s for s in observation.seeds if s.state is SeedState.DORMANT and s.options]
        if not dormant:
            return []
        seed, option = dormant[0], dormant[0].options[0]
        return [
            Decision(seed.seed_id, SeedState.GERMINATED, "patience", option.blueprint),
            Decision(seed.seed_id, SeedState.TRAINING, "grafted", option.blueprint),
        ]

    def update(self, observation, applied) -> None:
        self.epochs_seen += 1

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state) -> None:
        self.epochs_seen = state["epochs_seen"]


class BrokenPolicy(HeuristicPolicy):
    def __init__(self, config) -> None:
        raise KeyError("no such threshold")
