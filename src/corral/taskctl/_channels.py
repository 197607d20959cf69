"""Channels: the data connections the controller describes in CONFIGURE's arguments."""

from __future__ import annotations

from dataclasses import dataclass

_PREFIX = "chans."
_FIELDS = ("address", "method", "type", "transport")


@dataclass(frozen=True, slots=True)
class Channel:
    """One channel of a task, from the ``chans.NAME.*`` arguments of CONFIGURE.

    ``method`` is ``"bind"`` or ``"connect"``; ``type`` is the socket pattern
    (``push``, ``pull``, ``pub``, ``sub``); ``transport`` is e.g. ``"zeromq"``.
    """

    name: str
    address: str
    method: str
    type: str
    transport: str

    @property
    def binds(self) -> bool:
        return self.method == "bind"


def channels(args: dict[str, str]) -> dict[str, Channel]:
    """The channels named in CONFIGURE's arguments, by name.

    Raises ValueError naming the channel and the field when one is incomplete or its
    method is neither bind nor connect. ``transport`` defaults to ``"zeromq"``.
    """
    found: dict[str, dict[str, str]] = {}
    for key, value in args.items():
        if not key.startswith(_PREFIX):
            continue
        name, _, field = key[len(_PREFIX) :].rpartition(".")
        if not name or field not in _FIELDS:
            continue
        found.setdefault(name, {})[field] = value
    out: dict[str, Channel] = {}
    for name, fields in sorted(found.items()):
        fields.setdefault("transport", "zeromq")
        for field in ("address", "method", "type"):
            if not fields.get(field):
                raise ValueError(f"channel {name!r}: no chans.{name}.{field} argument")
        if fields["method"] not in ("bind", "connect"):
            raise ValueError(
                f"channel {name!r}: method {fields['method']!r} is neither bind nor connect"
            )
        out[name] = Channel(
            name, fields["address"], fields["method"], fields["type"], fields["transport"]
        )
    return out
