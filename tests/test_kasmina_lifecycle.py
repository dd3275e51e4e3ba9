"""The seed lifecycle: random command sequences stay legal, recorded and function-preserving."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kasmina_hosts import TinyMLP
from tolaria.config import KasminaConfig
from tolaria.contracts import LEGAL_TRANSITIONS, SeedState
from tolaria.errors import BlueprintError, IllegalTransitionError
from tolaria.kasmina import find_seeds, inject_seeds, seed_parameter_names

#: States whose forward must equal the host's whatever the blueprint's weights.
HOST_VALUED = {SeedState.DORMANT, SeedState.CULLED, SeedState.GERMINATED, SeedState.TRAINING}


class SeedLifecycle(RuleBasedStateMachine):
    """One seed of a tiny MLP driven by arbitrary commands, legal or not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.plain = TinyMLP()
        self.model = copy.deepcopy(self.plain)
        config = KasminaConfig(layers=["hidden.*"], chunks=2, blend_epochs=2, embargo_epochs=1)
        inject_seeds(self.model, config)
        self.x = torch.randn(4, 6)
        self.model(self.x)
        self.seed = find_seeds(self.model)[1]
        self.epoch = 0
        self.expected_history = 0

    @rule(blueprint=st.sampled_from(["residual_mlp", "low_rank", "se_gate", "conv2d_residual"]))
    def germinate(self, blueprint):
        before = self.seed.state
        try:
            self.seed.germinate(blueprint, epoch=self.epoch, reason="rule")
        except IllegalTransitionError:
            assert before is not SeedState.DORMANT and self.seed.state is before
        except BlueprintError:
            assert blueprint == "conv2d_residual" and self.seed.state is SeedState.DORMANT
        else:
            assert before is SeedState.DORMANT and self.seed.state is SeedState.GERMINATED
            self.expected_history += 1

    @rule(to=st.sampled_from(list(SeedState)))
    def transition(self, to):
        before = self.seed.state
        legal = to in LEGAL_TRANSITIONS[before] and to is not SeedState.GERMINATED
        try:
            self.seed.transition(to, epoch=self.epoch, reason="rule")
        except IllegalTransitionError:
            assert not legal and self.seed.state is before
        else:
            assert legal and self.seed.state is to
            self.expected_history += 1

    @rule()
    def end_epoch(self):
        before = self.seed.state
        self.seed.on_epoch_end(self.epoch)
        if before is not self.seed.state:
            assert (before, self.seed.state) == (SeedState.CULLED, SeedState.DORMANT)
            self.expected_history += 1
        self.epoch += 1

    @precondition(lambda self: self.seed.blueprint is not None)
    @rule(scale=st.floats(0.1, 2.0))
    def train_blueprint(self, scale):
        """Stand-in for optimisation: the blueprint's weights move away from zero."""
        with torch.no_grad():
            for p in self.seed.blueprint.parameters():
                p.add_(scale * torch.randn_like(p))

    @invariant()
    def alpha_in_range_and_state_consistent(self):
        seed = self.seed
        assert 0.0 <= seed.alpha <= 1.0
        assert (seed.blueprint is not None) == seed.state.holds_blueprint
        assert (seed.blueprint_name is not None) == seed.state.holds_blueprint
        if seed.state in (SeedState.PROBATIONARY, SeedState.FOSSILIZED):
            assert seed.alpha == 1.0
        elif seed.state is not SeedState.BLENDING:
            assert seed.alpha == 0.0

    @invariant()
    def history_is_a_legal_path_ending_here(self):
        history = self.seed.history
        assert len(history) == self.expected_history
        state = SeedState.DORMANT
        for record in history:
            assert record.from_state is state and record.to_state in LEGAL_TRANSITIONS[state]
            state = record.to_state
        assert state is self.seed.state
        assert all(a.epoch <= b.epoch for a, b in itertools.pairwise(history))

    @invariant()
    def parameters_match_state(self):
        names = {n for n, _ in self.model.named_parameters() if ".kasmina." in n}
        on_trial = seed_parameter_names(self.model)
        if self.seed.state.is_active:
            assert names == on_trial and names
        else:
            assert not on_trial
            assert bool(names) == (self.seed.state is SeedState.FOSSILIZED)

    @invariant()
    def host_output_preserved_until_blending(self):
        if self.seed.state in HOST_VALUED:
            assert torch.equal(self.model(self.x), self.plain(self.x))


TestSeedLifecycle = SeedLifecycle.TestCase
TestSeedLifecycle.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
def seed():
    model = TinyMLP()
    inject_seeds(model, KasminaConfig(layers=["hidden.*"], chunks=2, embargo_epochs=2))
    model(torch.randn(2, 6))
    return find_seeds(model)[0]


def test_every_transition_is_recorded_with_epoch_and_reason(seed):
    seed.germinate("low_rank", epoch=3, reason="plateau", rank=2)
    seed.transition(SeedState.TRAINING, epoch=3, reason="go")
    seed.transition(SeedState.CULLED, epoch=5, reason="no gain")
    assert [(r.epoch, r.from_state, r.to_state, r.reason, r.blueprint) for r in seed.history] == [
        (3, SeedState.DORMANT, SeedState.GERMINATED, "plateau", "low_rank"),
        (3, SeedState.GERMINATED, SeedState.TRAINING, "go", "low_rank"),
        (5, SeedState.TRAINING, SeedState.CULLED, "no gain", "low_rank"),
    ]
    assert seed.blueprint_name is None and seed.blueprint_kwargs == {}


def test_culled_seed_returns_to_dormant_after_embargo(seed):
    seed.germinate("residual_mlp", epoch=0)
    seed.transition(SeedState.CULLED, epoch=4, reason="bad")
    seed.on_epoch_end(4)  # the boundary it was culled at is not an embargo epoch
    seed.on_epoch_end(5)
    assert seed.state is SeedState.CULLED and seed.epochs_in_state == 1
    with pytest.raises(IllegalTransitionError, match="CULLED -> GERMINATED"):
        seed.germinate("residual_mlp", epoch=5)
    seed.on_epoch_end(6)
    assert seed.state is SeedState.DORMANT and seed.history[-1].epoch == 6
    assert seed.history[-1].reason.startswith("embargo")
    seed.germinate("residual_mlp", epoch=7)
    assert seed.state is SeedState.GERMINATED


def test_epoch_counting_is_independent_of_call_order(seed):
    twin = copy.deepcopy(seed)
    seed.germinate("residual_mlp", epoch=2)
    twin.germinate("residual_mlp", epoch=2)
    seed.on_epoch_end(2)
    seed.transition(SeedState.TRAINING, epoch=2, reason="")  # decided, then counted
    twin.transition(SeedState.TRAINING, epoch=2, reason="")
    twin.on_epoch_end(2)
    for epoch in (3, 3, 4):  # a repeated call counts once
        seed.on_epoch_end(epoch)
        twin.on_epoch_end(epoch)
    assert seed.epochs_in_state == twin.epochs_in_state == 2


def test_illegal_transitions_raise_and_fossilized_is_terminal(seed):
    with pytest.raises(IllegalTransitionError, match="DORMANT -> TRAINING"):
        seed.transition(SeedState.TRAINING, epoch=0, reason="")
    with pytest.raises(IllegalTransitionError, match="germinate"):
        seed.transition(SeedState.GERMINATED, epoch=0, reason="")
    seed.germinate("residual_mlp", epoch=0)
    for to in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY):
        seed.transition(to, epoch=0, reason="")
    seed.transition(SeedState.FOSSILIZED, epoch=1, reason="")
    for to in SeedState:
        with pytest.raises(IllegalTransitionError):
            seed.transition(to, epoch=2, reason="")
    assert seed.state is SeedState.FOSSILIZED and seed.blueprint is not None
