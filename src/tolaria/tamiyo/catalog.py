"""The graft catalog: which configured blueprints fit a seed's chunk, what each costs, and
the :class:`GraftOption` a policy sees for it (cost, penalty, descriptors).

A seed is offered the blueprints configured for its place, the seeded layer it sits on
(``TamiyoConfig.blueprints_for``): every layer's, or those a ``{glob: [...]}`` mapping gives
it.  A mapping is checked whole before germination: a blueprint placed where it cannot fit
is a mistake in the config, not something to skip over at every plateau.

Costs come from each blueprint's closed-form ``param_cost`` and are memoised by (blueprint,
chunk shape): a controller prices every DORMANT seed at every epoch end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from tolaria.config import KasminaConfig, TamiyoConfig
from tolaria.contracts import SeedState
from tolaria.errors import BlueprintError, ConfigError
from tolaria.kasmina import KasminaSeed, available_blueprints, get_blueprint
from tolaria.kasmina.blueprints import blueprint_shapes, fits
from tolaria.tamiyo.emergency import IncidentMemory
from tolaria.tamiyo.policy import GraftOption

Shape = tuple[int, ...]


def place(seed: KasminaSeed) -> str:
    """The seeded layer ``seed`` sits on (its ``KasminaLayer.module_fqn``)."""
    return seed.seed_id.rpartition(".")[0]


def _shape_text(shape: Shape) -> str:
    return str(list(shape))


class GraftCatalog:
    def __init__(self, config: TamiyoConfig, kasmina_config: KasminaConfig) -> None:
        unknown = [name for name in config.blueprint_names() if name not in available_blueprints()]
        if unknown:
            raise ConfigError(
                f"tamiyo.blueprints: unknown blueprint(s) {unknown} "
                f"(available: {sorted(available_blueprints())})"
            )
        self.config = config
        self.kasmina_config = kasmina_config
        #: (blueprint, chunk shape) -> (parameters, receptive field), None if it does not fit.
        self._priced: dict[tuple[str, Shape], tuple[int, float] | None] = {}

    def _kwargs(self, name: str) -> dict:
        return self.config.blueprint_kwargs.get(name, {})

    def price(
        self, name: str, chunk_shape: Shape, input_shape: Shape | None = None
    ) -> tuple[int, float] | None:
        """``(parameters, receptive field)`` of ``name`` on this chunk (of a module whose
        input has per-sample shape ``input_shape``), None if it does not fit; ``ConfigError``
        if its ``blueprint_kwargs`` do not fit it."""
        blueprint = get_blueprint(name)
        shapes = blueprint_shapes(blueprint, chunk_shape, input_shape)
        key = (name, shapes)
        if key not in self._priced:
            kwargs = self._kwargs(name)
            try:
                self._priced[key] = (
                    (blueprint.param_cost(*shapes, **kwargs),
                     blueprint.receptive_field(*shapes, **kwargs))
                    if fits(blueprint, chunk_shape, input_shape) else None
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"tamiyo.blueprint_kwargs.{name}: {kwargs!r} do not fit {name!r} ({exc})"
                ) from None
        return self._priced[key]

    def price_at(self, name: str, seed: KasminaSeed) -> tuple[int, float] | None:
        """:meth:`price` of ``name`` on ``seed``'s chunk, which must be known."""
        return self.price(name, tuple(seed.chunk_shape), seed.input_shape)

    def options(
        self,
        seed: KasminaSeed,
        penalties: Mapping[tuple[str, str], float],
        incidents: IncidentMemory,
    ) -> tuple[GraftOption, ...]:
        """What a DORMANT seed with a known chunk could be grafted with; () otherwise."""
        if seed.state is not SeedState.DORMANT or seed.chunk_shape is None:
            return ()
        options = []
        for name in self.config.blueprints_for(place(seed)):
            priced = self.price_at(name, seed)
            if priced is not None:
                options.append(GraftOption(
                    blueprint=name,
                    param_cost=priced[0],
                    penalty=penalties.get((seed.seed_id, name), 0.0),
                    forbidden=incidents.is_forbidden(seed.seed_id, name),
                    kind=get_blueprint(name).kind,
                    receptive_field=priced[1],
                ))
        return tuple(options)

    def check(self, seeds: Iterable[KasminaSeed]) -> None:
        """Build every blueprint offered to a seed once on each chunk shape it is offered on
        (after a forward pass taught the seeds their chunks), so that a graft that can never
        happen is refused now, in one line, rather than found at the first plateau -- or never.

        ``ConfigError`` if a ``blueprints`` mapping misplaces anything (:meth:`_check_places`),
        if ``blueprint_kwargs`` break a blueprint on a chunk it supports, or if no configured
        blueprint fits any seed.  The global RNG is left untouched.
        """
        seeds = list(seeds)
        known = [seed for seed in seeds if seed.chunk_shape]
        if not known:
            return
        if isinstance(self.config.blueprints, dict):
            self._check_places(seeds)
        # (blueprint, chunk and input shapes) it fits and is offered on -> a seed to build it on.
        offered: dict[tuple[str, Shape, Shape | None], KasminaSeed] = {}
        for seed in known:
            for name in self.config.blueprints_for(place(seed)):
                if self.price_at(name, seed) is not None:  # a list's misfits: fine elsewhere
                    offered.setdefault((name, tuple(seed.chunk_shape), seed.input_shape), seed)
        for (name, *_), seed in offered.items():
            try:
                with torch.random.fork_rng(devices=[]):
                    seed.build_blueprint(name, self._kwargs(name))
            except BlueprintError as exc:
                raise ConfigError(f"tamiyo.blueprint_kwargs.{name}: {exc}") from None
        if not offered:
            shapes = sorted({tuple(seed.chunk_shape) for seed in known})
            raise ConfigError(
                f"tamiyo.blueprints={self.config.blueprints}: none fits any seed's chunk "
                f"(chunk shapes {shapes} at kasmina.layers="
                f"{self.kasmina_config.layers}); choose blueprints for these layers "
                f"(available: {available_blueprints()})"
            )

    def _check_places(self, seeds: list[KasminaSeed]) -> None:
        """A ``{glob: [blueprint, ...]}`` mapping must place every seeded layer, and every
        blueprint must fit each chunk of the layers it is placed on (the chunks known: a seed
        no forward pass reached has none yet).  A glob may place nothing: the default
        mapping names places (``flatten``, ``hidden.*``) that ``kasmina.layers`` may leave out."""
        mapping: dict[str, list[str]] = self.config.blueprints
        layers: dict[str, list[KasminaSeed]] = {}  # seeded layer -> its seeds whose chunk is known
        for seed in seeds:
            known = layers.setdefault(place(seed), [])
            if seed.chunk_shape:
                known.append(seed)
        for layer, known in layers.items():
            glob = self.config.blueprint_glob(layer)
            if glob is None:
                fit = (f"; blueprints that fit its chunk {_shape_text(known[0].chunk_shape)}: "
                       f"{self._fitting(known[0])}" if known else "")
                raise ConfigError(
                    f"tamiyo.blueprints: seeded layer {layer!r} matches no glob of "
                    f"{list(mapping)}{fit}"
                )
            for name in mapping[glob]:
                misfit = next((seed for seed in known if self.price_at(name, seed) is None), None)
                if misfit is not None:
                    raise ConfigError(
                        f"tamiyo.blueprints[{glob!r}]: {name} does not fit seeded layer "
                        f"{layer!r} (chunk {_shape_text(misfit.chunk_shape)}; {name} takes "
                        f"{get_blueprint(name).supports_text}); blueprints that fit "
                        f"there: {self._fitting(misfit)}"
                    )

    @staticmethod
    def _fitting(seed: KasminaSeed) -> str:
        """The registered blueprints whose ``supports`` accepts ``seed``'s chunk."""
        names = [name for name in available_blueprints()
                 if fits(get_blueprint(name), seed.chunk_shape, seed.input_shape)]
        return ", ".join(names) or "none"
