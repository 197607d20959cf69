"""Plain data shared by every layer: the plan, the state-machine vocabulary.

Pure: no I/O, no clock, no randomness.
"""

from corral.model.plan import (
    Bind,
    CallSpec,
    Collection,
    Command,
    Connect,
    Constraint,
    HealthCheck,
    Plan,
    PublicVar,
    Resources,
    TaskSpec,
)
from corral.model.vocabulary import EVENTS, STATES, Trigger, TriggerError, parse_trigger

__all__ = [
    "EVENTS",
    "STATES",
    "Bind",
    "CallSpec",
    "Collection",
    "Command",
    "Connect",
    "Constraint",
    "HealthCheck",
    "Plan",
    "PublicVar",
    "Resources",
    "TaskSpec",
    "Trigger",
    "TriggerError",
    "parse_trigger",
]
