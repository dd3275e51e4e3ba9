"""The reward of a decision point's outcome (ACADEMY §2), defined once, here.

For a graft, however it settled (fossilized, culled, failed to germinate, undone by a
rollback)::

    reward = gain_accuracy - PARAM_COST_WEIGHT * param_cost / host_params
                           - INCIDENT_PENALTY * incidents

``gain_accuracy`` is the validation-accuracy gain measured at judgement (the seed against
its alpha forced to 0); a graft culled before it was judged gained nothing measurable, so
0.  Waiting is the reference: 0.  A learned policy therefore grafts only where the graft is
expected to pay for its parameters and its risk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: λ: accuracy a graft must gain per host's worth of parameters it adds.  At 0.05 the
#: default job's signal_conv1d (353 parameters on a 2,698-parameter host) costs 0.65 points
#: of accuracy, and a graft as large as the host itself costs 5 points.
PARAM_COST_WEIGHT = 0.05
#: Per incident a graft was implicated in (a rollback): far more than any plausible gain, so
#: a graft that destabilised training scores below one that merely did not help.
INCIDENT_PENALTY = 0.5

def reward(outcome: Mapping[str, Any], host_params: int) -> float:
    """The reward of ``outcome`` (a ``growth_outcome`` record's fields, or ``{"result":
    "wait"}``) for a host of ``host_params`` parameters."""
    if outcome["result"] == "wait":
        return 0.0
    if host_params <= 0:
        raise ValueError(f"host_params must be positive, got {host_params}")
    gain = outcome.get("gain_accuracy")
    gain = gain if gain is not None and math.isfinite(gain) else 0.0
    return (gain - PARAM_COST_WEIGHT * outcome["param_cost"] / host_params
            - INCIDENT_PENALTY * outcome["incidents"])
