"""Tamiyo: the controller that decides when, where and what to grow, and when to roll back."""

from tolaria.tamiyo.controller import TamiyoController
from tolaria.tamiyo.decisions import DecisionLog, DecisionRecord
from tolaria.tamiyo.emergency import ChanceLevel, Emergency, EmergencyDetector, IncidentMemory
from tolaria.tamiyo.policy import (
    Decision,
    GraftOption,
    HeuristicPolicy,
    Observation,
    Policy,
    SeedView,
    make_policy,
)

__all__ = [
    "ChanceLevel",
    "Decision",
    "DecisionLog",
    "DecisionRecord",
    "Emergency",
    "EmergencyDetector",
    "GraftOption",
    "HeuristicPolicy",
    "IncidentMemory",
    "Observation",
    "Policy",
    "SeedView",
    "TamiyoController",
    "make_policy",
]
