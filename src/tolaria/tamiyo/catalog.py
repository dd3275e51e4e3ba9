"""The graft catalog: which configured blueprints fit a seed's chunk, what each costs, and
the :class:`GraftOption` a policy sees for it (cost, penalty, descriptors).

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
from tolaria.kasmina.blueprints import blueprint_shapes
from tolaria.tamiyo.emergency import IncidentMemory
from tolaria.tamiyo.policy import GraftOption

Shape = tuple[int, ...]


class GraftCatalog:
    def __init__(self, config: TamiyoConfig, kasmina_config: KasminaConfig) -> None:
        unknown = [name for name in config.blueprints if name not in available_blueprints()]
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
                    if shapes is not None and blueprint.supports(*shapes) else None
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"tamiyo.blueprint_kwargs.{name}: {kwargs!r} do not fit {name!r} ({exc})"
                ) from None
        return self._priced[key]

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
        for name in self.config.blueprints:
            priced = self.price(name, tuple(seed.chunk_shape), seed.input_shape)
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
        """Build every configured blueprint once on every chunk shape the seeds have (after
        a forward pass taught them), so that a graft that can never happen is refused now,
        in one line, rather than found at the first plateau -- or never.

        ``ConfigError`` if ``blueprint_kwargs`` break a blueprint on a chunk it supports,
        or if no configured blueprint fits any seed.  The global RNG is left untouched.
        """
        by_shape = {(tuple(s.chunk_shape), s.input_shape): s for s in seeds if s.chunk_shape}
        if not by_shape:
            return
        fits = 0
        for name in self.config.blueprints:
            for shapes, seed in by_shape.items():
                if self.price(name, *shapes) is None:
                    continue  # this blueprint does not support this chunk: fine elsewhere
                try:
                    with torch.random.fork_rng(devices=[]):
                        seed.build_blueprint(name, self._kwargs(name))
                except BlueprintError as exc:
                    raise ConfigError(f"tamiyo.blueprint_kwargs.{name}: {exc}") from None
                fits += 1
        if not fits:
            raise ConfigError(
                f"tamiyo.blueprints={self.config.blueprints}: none fits any seed's chunk "
                f"(chunk shapes {sorted({c for c, _ in by_shape})} at kasmina.layers="
                f"{self.kasmina_config.layers}); choose blueprints for these layers "
                f"(available: {available_blueprints()})"
            )
