"""The words of the environment state machine, and hook trigger moments.

A trigger names a moment of a transition where an integrated-service call starts
(or is awaited): ``before_CONFIGURE+100``, ``after_DEPLOY-1``, ``enter_RUNNING``,
``leave_CONFIGURED``, or a bare event (``CONFIGURE``, ``DESTROY``). The optional
signed weight orders calls at the same moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EVENTS: tuple[str, ...] = (
    "DEPLOY",
    "CONFIGURE",
    "START_ACTIVITY",
    "STOP_ACTIVITY",
    "RESET",
    "EXIT",
    "GO_ERROR",
    "RECOVER",
    "DESTROY",
)
STATES: tuple[str, ...] = ("STANDBY", "DEPLOYED", "CONFIGURED", "RUNNING", "ERROR", "DONE")

_PHASE_RANK = {"before": 0, "": 1, "after": 2}
_TRIGGER_RE = re.compile(r"^(?:(before|after|enter|leave)_)?([A-Z_]+?)([+-]\d{1,9})?$")


class TriggerError(ValueError):
    """A trigger text that names no moment of the state machine."""


@dataclass(frozen=True, slots=True)
class Trigger:
    """A moment of a transition plus a weight; ``str()`` gives the template spelling."""

    phase: str  # "before", "after", "enter", "leave" or "" (the bare event)
    name: str  # an event (before/after/bare) or a state (enter/leave)
    weight: int = 0

    @property
    def moment(self) -> str:
        return f"{self.phase}_{self.name}" if self.phase else self.name

    def __str__(self) -> str:
        if self.weight == 0:
            return self.moment
        return f"{self.moment}{self.weight:+d}"

    def not_before(self, other: Trigger) -> bool:
        """True unless both moments belong to one event and self comes first.

        Moments of different events or of states are not ordered here; the
        lifecycle orders them when it runs a transition.
        """
        if self.phase in ("enter", "leave") or other.phase in ("enter", "leave"):
            return True
        if self.name != other.name:
            return True
        mine = (_PHASE_RANK[self.phase], self.weight)
        theirs = (_PHASE_RANK[other.phase], other.weight)
        return mine >= theirs


def parse_trigger(text: str) -> Trigger:
    """Parse ``before_CONFIGURE+100`` and friends; raise TriggerError with the reason."""
    m = _TRIGGER_RE.match(text.strip())
    if m is None:
        raise TriggerError(
            f"bad trigger {text!r}: expected before_EVENT, after_EVENT, enter_STATE, "
            "leave_STATE or EVENT, with an optional +N/-N weight"
        )
    phase, name, weight = m.group(1) or "", m.group(2), int(m.group(3) or 0)
    if phase in ("enter", "leave"):
        if name not in STATES:
            raise TriggerError(
                f"bad trigger {text!r}: {name!r} is not a state (one of {', '.join(STATES)})"
            )
    elif name not in EVENTS:
        raise TriggerError(
            f"bad trigger {text!r}: {name!r} is not an event (one of {', '.join(EVENTS)})"
        )
    return Trigger(phase, name, weight)
