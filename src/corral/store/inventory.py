"""Inventory files: the nodes of a farm, in YAML, for placement.

nodes:
  - name: flp1
    cpu: 32
    memory: 128000          # MB
    gpu: 0
    ports: 20000-29999      # an inclusive range
    pool: sync
    labels: {role: flp, detector: TPC}
    cordoned: false
"""

from __future__ import annotations

from typing import Any

import yaml

from corral.model.inventory import Node
from corral.templates.schema import too_deep

FIELDS = {"name", "cpu", "memory", "gpu", "ports", "pool", "labels", "cordoned"}
DEFAULT_PORTS = (20000, 29999)


class InventoryError(ValueError):
    """A broken inventory file; the message says which node and field."""


MAX_NESTING = 64  # lists and maps in lists and maps: an inventory needs 4


def load_inventory(path: str) -> list[Node]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if too_deep(text, MAX_NESTING) is not None:
            raise InventoryError(f"{path}: lists and maps nest more than {MAX_NESTING} deep")
        doc = yaml.load(text, Loader=yaml.CSafeLoader)
    except OSError as e:
        raise InventoryError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InventoryError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise InventoryError(f"{path}: not YAML: {e}") from None
    except RecursionError:
        raise InventoryError(f"{path}: lists and maps nest too deep") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise InventoryError(f"{path}: expected a mapping with a list `nodes`")
    out: list[Node] = []
    seen: set[str] = set()
    for n, item in enumerate(doc["nodes"], 1):
        where = f"{path}: node {n}"
        if not isinstance(item, dict):
            raise InventoryError(f"{where}: expected a mapping")
        unknown = set(item) - FIELDS
        if unknown:
            raise InventoryError(f"{where}: unknown field {sorted(unknown)[0]!r} "
                                 f"(fields: {', '.join(sorted(FIELDS))})")  # fmt: skip
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InventoryError(f"{where}: `name` is missing")
        if name in seen:
            raise InventoryError(f"{where}: node {name!r} appears twice")
        seen.add(name)
        out.append(_node(f"{path}: node {name}", item))
    return out


def _node(where: str, item: dict[str, Any]) -> Node:
    def number(key: str, kind: type) -> Any:
        v = item.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InventoryError(f"{where}: `{key}` must be a number >= 0, not {v!r}")
        return kind(v)

    ports = item.get("ports", "")
    lo, hi = DEFAULT_PORTS  # tcp channels and tasks' ports come from here
    if ports not in ("", None):
        text = str(ports)
        a, sep, b = text.partition("-")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) > int(b):
            raise InventoryError(f"{where}: `ports` must be a range like 20000-29999, not {text!r}")
        lo, hi = int(a), int(b)
    labels = item.get("labels") or {}
    if not isinstance(labels, dict):
        raise InventoryError(f"{where}: `labels` must be a mapping")
    return Node(
        item["name"],
        cpu=number("cpu", float),
        memory=number("memory", int),
        gpu=number("gpu", int),
        ports=(lo, hi),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        pool=str(item.get("pool", "default")),
        cordoned=bool(item.get("cordoned", False)),
    )
