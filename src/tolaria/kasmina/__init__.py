"""Kasmina: seeds embedded in a host that watch their chunk and graft blueprints safely.

``inject_seeds`` instruments a host, ``find_seeds`` lists its seeds, each seed carries
one blueprint through DORMANT -> GERMINATED -> TRAINING -> BLENDING -> PROBATIONARY ->
FOSSILIZED (or CULLED), and ``export_structure``/``replay_structure`` carry the grown
architecture across checkpoints.
"""

from tolaria.kasmina.blueprints import (
    Blueprint,
    ChannelLinear,
    available_blueprints,
    get_blueprint,
    register_blueprint,
    unregister_blueprint,
)
from tolaria.kasmina.layer import (
    KasminaLayer,
    bind_chunks,
    collect_telemetry,
    find_seeds,
    inject_seeds,
)
from tolaria.kasmina.seed import KasminaSeed, TransitionRecord, blend_alpha
from tolaria.kasmina.structure import (
    STRUCTURE_VERSION,
    ablated,
    export_structure,
    replay_structure,
    seed_parameter_names,
)

__all__ = [
    "STRUCTURE_VERSION",
    "Blueprint",
    "ChannelLinear",
    "KasminaLayer",
    "KasminaSeed",
    "TransitionRecord",
    "ablated",
    "available_blueprints",
    "bind_chunks",
    "blend_alpha",
    "collect_telemetry",
    "export_structure",
    "find_seeds",
    "get_blueprint",
    "inject_seeds",
    "register_blueprint",
    "replay_structure",
    "seed_parameter_names",
    "unregister_blueprint",
]
