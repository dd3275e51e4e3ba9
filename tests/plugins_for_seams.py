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


#: What ``shifting_blobs`` adds to every input: a test changes it between train and resume.
SHIFT = {"value": 0.0}


def shifting_blobs(n: int = 192):
    """``(train, test, classes)``: Gaussian blobs, shifted by ``SHIFT`` -- the same shape
    whatever the shift, so only the content tells two versions apart."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 8, generator=g) + SHIFT["value"]
    return TensorDataset(x, y), TensorDataset(x[:32].clone(), y[:32].clone()), 3


class NanFrom:
    """A host whose logits turn NaN in training from epoch ``epoch`` on (counted by the
    trainer's epochs, read from a module-level clock the test sets), every time."""

    def __new__(cls, input_shape, num_classes, epoch: int = 2):
        import torch
        from torch import nn

        class Host(nn.Module):
            def __init__(self):
                super().__init__()
                self.flatten = nn.Flatten()
                self.body = nn.Sequential(nn.Linear(input_shape[-1], 16), nn.ReLU())
                self.head = nn.Linear(16, num_classes)
                self.register_buffer("batches", torch.zeros((), dtype=torch.long))

            def forward(self, x):
                out = self.head(self.body(self.flatten(x)))
                if self.training:
                    self.batches += 1
                    if self.batches > epoch * BATCHES_PER_EPOCH["value"]:
                        out = out * float("nan")
                return out

        return Host()


BATCHES_PER_EPOCH = {"value": 6}
