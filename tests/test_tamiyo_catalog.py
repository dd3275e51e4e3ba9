"""Blueprints per place: ``tamiyo.blueprints`` as a list (every seeded layer) or as a
``{glob: [blueprint, ...]}`` mapping, resolved by the first matching glob and checked whole
before germination."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina_hosts import shapes_at
from packets import make_packet
from tolaria.config import KasminaConfig, TamiyoConfig, load_config
from tolaria.config_comments import commented_yaml
from tolaria.contracts import SeedState
from tolaria.errors import ConfigError
from tolaria.kasmina import available_blueprints, find_seeds, get_blueprint, inject_seeds
from tolaria.tamiyo import TamiyoController
from tolaria.tamiyo.catalog import GraftCatalog, place
from tolaria.tamiyo.emergency import IncidentMemory

KASMINA = KasminaConfig(layers=["flatten", "hidden.*"])
PLACES = {"flatten": ["signal_conv1d", "residual_mlp"], "hidden.*": ["residual_mlp"]}


class Host(nn.Module):
    """A flat input of 6 features and two hidden layers (16 and 8 units)."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList([
            nn.Sequential(nn.Linear(6, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 8), nn.ReLU()),
        ])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden[1](self.hidden[0](self.flatten(x))))


def seeded_host(kasmina: KasminaConfig = KASMINA) -> tuple[Host, list]:
    """The host with seeds that know their chunks (one forward pass)."""
    torch.manual_seed(0)
    model = Host()
    inject_seeds(model, kasmina)
    model(torch.randn(4, 6))
    return model, find_seeds(model)


def check(blueprints, kasmina: KasminaConfig = KASMINA) -> GraftCatalog:
    catalog = GraftCatalog(TamiyoConfig(blueprints=blueprints), kasmina)
    catalog.check(seeded_host(kasmina)[1])
    return catalog


def test_the_first_matching_glob_in_mapping_order_places_a_layer():
    config = TamiyoConfig(blueprints={
        "hidden.0": ["low_rank"], "hidden.*": ["residual_mlp", "se_gate"], "*": ["low_rank"],
    })
    assert config.blueprint_glob("hidden.0") == "hidden.0"
    assert config.blueprints_for("hidden.0") == ["low_rank"]
    assert config.blueprints_for("hidden.1") == ["residual_mlp", "se_gate"]
    assert config.blueprints_for("flatten") == ["low_rank"]
    assert config.blueprint_names() == ["low_rank", "residual_mlp", "se_gate"]
    listed = TamiyoConfig(blueprints=["se_gate", "low_rank"])
    assert listed.blueprints_for("anything") == ["se_gate", "low_rank"]
    assert listed.blueprint_glob("anything") is None


def test_each_seed_is_offered_only_the_blueprints_of_its_place():
    catalog = check(PLACES)
    offered = {
        seed.seed_id: [o.blueprint for o in catalog.options(seed, {}, IncidentMemory())]
        for seed in seeded_host()[1]
    }
    assert offered == {
        "flatten.0": ["signal_conv1d", "residual_mlp"],
        "hidden.0.0": ["residual_mlp"],
        "hidden.1.0": ["residual_mlp"],
    }


def test_a_list_is_offered_everywhere_and_its_misfits_are_skipped_as_before():
    catalog = check(["conv2d_residual", "low_rank"])  # conv2d fits no flat chunk: fine
    (seed, *_) = seeded_host()[1]
    assert [o.blueprint for o in catalog.options(seed, {}, IncidentMemory())] == ["low_rank"]
    with pytest.raises(ConfigError, match="none fits any seed"):
        check(["conv2d_residual"])


def test_a_blueprint_mapped_where_it_cannot_fit_is_refused_with_what_would():
    with pytest.raises(ConfigError) as caught:
        check({"flatten": ["signal_conv1d"], "hidden.*": ["residual_mlp", "conv2d_residual"]})
    seed = next(s for s in seeded_host()[1] if s.seed_id.startswith("hidden.0"))
    fitting = [n for n in available_blueprints()
               if get_blueprint(n).supports(*shapes_at(seed, get_blueprint(n)))]
    assert str(caught.value) == (
        "tamiyo.blueprints['hidden.*']: conv2d_residual does not fit seeded layer 'hidden.0' "
        "(chunk [16]; conv2d_residual takes a 2-D feature map [C, H, W]); blueprints that "
        f"fit there: {', '.join(fitting)}"
    )
    assert "conv2d_residual" not in fitting and {"residual_mlp", "widen"} <= set(fitting)


def test_a_seeded_layer_no_glob_places_is_refused():
    with pytest.raises(ConfigError, match=(
        r"^tamiyo\.blueprints: seeded layer 'hidden\.0' matches no glob of \['flatten'\]; "
        r"blueprints that fit its chunk \[16\]: .*residual_mlp"
    )):
        check({"flatten": ["signal_conv1d"]})


def test_a_layer_no_forward_pass_reached_is_placed_but_not_yet_judged():
    torch.manual_seed(0)
    model = Host()
    inject_seeds(model, KASMINA)
    model.hidden[0](model.flatten(torch.randn(4, 6)))  # hidden.1's seed never sees a chunk
    seeds = find_seeds(model)
    reached = {"flatten": ["low_rank"], "hidden.0": ["low_rank"]}
    unjudged = GraftCatalog(TamiyoConfig(blueprints={**reached, "hidden.1": ["conv2d_residual"]}),
                            KASMINA)
    unjudged.check(seeds)  # conv2d_residual cannot be judged on a chunk not seen yet
    with pytest.raises(ConfigError) as caught:
        GraftCatalog(TamiyoConfig(blueprints=reached), KASMINA).check(seeds)
    assert str(caught.value) == (
        "tamiyo.blueprints: seeded layer 'hidden.1' matches no glob of ['flatten', 'hidden.0']"
    )


def test_a_glob_that_places_no_seeded_layer_is_accepted():
    """A mapping may name places this host's kasmina.layers leave out (the default mapping
    has ``flatten`` and ``hidden.*``, and a CNN host seeds ``hidden.*`` only)."""
    check({"*": ["residual_mlp"], "head": ["low_rank"]})


def test_an_unknown_blueprint_anywhere_in_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"unknown blueprint\(s\) \['no_such'\]"):
        GraftCatalog(TamiyoConfig(blueprints={"*": ["low_rank"], "x": ["no_such"]}), KASMINA)


@pytest.mark.parametrize("value, message", [
    ("residual_mlp", "expected a list of blueprint names or a mapping {layer glob: [blueprint"),
    ("{flatten: residual_mlp}", "expected a list of blueprint names or a mapping"),
    ("[1, 2]", "expected a list of blueprint names or a mapping"),
    ("{flatten: [signal_conv1d], hidden.0: []}", "glob 'hidden.0' maps to no blueprints"),
])
def test_a_malformed_blueprints_value_is_one_line(value, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"tamiyo.blueprints={value}"])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).count("tamiyo.blueprints") == 1


def test_a_mapping_set_on_the_command_line_keeps_its_order_and_round_trips(tmp_path):
    config = load_config(
        None, ['tamiyo.blueprints={"hidden.*": [residual_mlp], flatten: [signal_conv1d]}']
    )
    assert list(config.tamiyo.blueprints) == ["hidden.*", "flatten"]
    for text in (config.to_yaml(), commented_yaml(config)):
        (tmp_path / "config.yaml").write_text(text)
        again = load_config(tmp_path / "config.yaml")
        assert again == config and list(again.tamiyo.blueprints) == ["hidden.*", "flatten"]


def test_every_builtin_says_what_it_supports():
    texts = {name: get_blueprint(name).supports_text for name in available_blueprints()}
    assert texts["conv1d_residual"] == "a 1-D feature map [C, L]"
    assert "not hidden units" in texts["signal_conv1d"]
    assert texts["residual_mlp"] == "any chunk [C, ...]"


def test_the_heuristic_grafts_each_place_only_what_is_mapped_to_it():
    places = {"hidden.0": ["low_rank"], "hidden.1": ["se_gate", "residual_mlp"]}
    kasmina = KasminaConfig(layers=["hidden.*"], chunks=2)
    model, seeds = seeded_host(kasmina)
    controller = TamiyoController(
        TamiyoConfig(
            blueprints=places, plateau_patience=1, plateau_min_improvement=10.0,  # always a plateau
            max_active_seeds=4, max_germinations_per_epoch=4, param_budget_fraction=10.0,
        ),
        kasmina, num_classes=3, host_parameters=sum(p.numel() for p in model.parameters()),
        event_sink=lambda kind, **fields: None,
    )
    for seed in seeds:
        controller.register_seed(seed)
    controller.check_grafts()
    grafts = []
    for epoch in range(3):
        model(torch.randn(8, 6)).sum().backward()
        controller.on_epoch_boundary(epoch)
        signal = controller.step(make_packet(
            epoch, 1.0, 0.5, health_map=controller.health_map, seed_states=controller.seed_states
        ))
        grafts += [(a.seed_id, a.blueprint) for a in signal.adaptations
                   if a.to_state is SeedState.GERMINATED]
    assert sorted(grafts) == [
        ("hidden.0.0", "low_rank"), ("hidden.0.1", "low_rank"),
        ("hidden.1.0", "se_gate"), ("hidden.1.1", "se_gate"),
    ]
    assert {place(seed) for seed in seeds} == {"hidden.0", "hidden.1"}
