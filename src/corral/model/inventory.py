"""Nodes: the machines tasks run on, with their resources and labels. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Node:
    """A node's capacity and labels. memory in MB; ports is an inclusive range."""

    name: str
    cpu: float = 0.0
    memory: int = 0
    gpu: int = 0
    ports: tuple[int, int] = (0, -1)  # empty range: no ports to give
    labels: tuple[tuple[str, str], ...] = ()
    pool: str = "default"
    cordoned: bool = False
    down: bool = False  # its backend lost it: nothing new goes there
    _label_map: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._label_map.update(self.labels)
        self._label_map.setdefault("machine_id", self.name)
        self._label_map.setdefault("hostname", self.name)
        self._label_map.setdefault("pool", self.pool)

    def label(self, key: str) -> str | None:
        """A label's value; ``machine_id``, ``hostname`` and ``pool`` always exist."""
        return self._label_map.get(key)

    @property
    def schedulable(self) -> bool:
        return not self.cordoned and not self.down

    @property
    def port_count(self) -> int:
        return max(0, self.ports[1] - self.ports[0] + 1)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "cpu": self.cpu,
            "memory": self.memory,
            "gpu": self.gpu,
            "ports": list(self.ports),
            "labels": dict(self.labels),
            "pool": self.pool,
            "cordoned": self.cordoned,
            "down": self.down,
        }
