"""Which variables a caller may set, and with what values. Pure.

A workflow declares what its users may choose with ``!public`` (its type, its allowed
values). ``refusals(public, variables)`` names the variables a caller set that are not declared
public (a non-admin may not set them), ``bad_values`` those whose value is not of the
declared type or not one of the allowed values. Admins may set any variable; viewers
render with public ones only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

from corral.model.plan import PublicVar
from corral.templates.diagnostics import Diagnostics
from corral.templates.expressions import is_falsy, is_truthy
from corral.templates.library import Library, Sources
from corral.templates.schema import RoleDef, VarDef


def public_var(vd: VarDef) -> PublicVar:
    """The ``!public`` declaration of a variable (``vd.public`` is set)."""
    spec = vd.public or {}
    return PublicVar(
        name=vd.name,
        value=vd.value.raw,
        type=spec.get("type", "string"),
        label=spec.get("label"),
        description=spec.get("description"),
        widget=spec.get("widget"),
        values=spec.get("values", ()),
        panel=spec.get("panel"),
        index=spec.get("index"),
        visible_if=spec.get("visibleif"),
        rows=spec.get("rows"),
    )


def declared(path: str, sources: Sources) -> tuple[list[PublicVar], dict[str, str], bool]:
    """The public variables the workflow at ``path`` and the workflows it includes by
    a literal name declare, read without expanding, where each is declared
    (``FILE:LINE:COL``), and whether an include's name is computed (its file, which may
    declare more, is known only by expanding)."""
    lib = Library(path, sources, Diagnostics())
    public: list[PublicVar] = []
    where: dict[str, str] = {}
    computed = False
    files = [lib.root_file]
    seen: set[str] = set()
    while files:
        file = files.pop()
        if file in seen or len(seen) >= 64:
            continue
        seen.add(file)
        wf = lib.workflow(file)
        if wf is None:
            continue
        todo: list[RoleDef] = [wf.root]
        while todo:
            r = todo.pop()
            for vd in r.defaults + r.vars:
                if vd.public is not None and vd.name not in where:
                    public.append(public_var(vd))
                    where[vd.name] = str(vd.loc)
            if r.include is not None:
                ref = r.include.const
                found = None
                if ref is not None:
                    try:
                        found = lib.find_include(ref.strip(), r.file)
                    except ValueError:
                        found = None
                if found is None:
                    computed = True
                else:
                    files.append(found)
            todo += r.roles or []
    return public, where, computed


def refusals(public: Iterable[PublicVar], variables: Mapping[str, str]) -> list[str]:
    """Variables of ``variables`` that ``public`` does not declare: a non-admin may not
    set them (403)."""
    known = {p.name for p in public}
    return [
        f"variable {name!r} is not public in this workflow: only an admin sets it"
        for name in variables
        if name not in known
    ]


def bad_values(
    public: Iterable[PublicVar], variables: Mapping[str, str], where: Mapping[str, str] = {}
) -> list[str]:
    """Public variables of ``variables`` whose value is not of the declared type or not
    among the declared values (422); ``where``: declarations' places, for the messages."""
    known = {p.name: p for p in public}
    out: list[str] = []
    for name, value in variables.items():
        p = known.get(name)
        why = None if p is None else _value_problem(p, value)
        if why is not None:
            at = f"{where[name]}: " if name in where else ""
            out.append(f"{at}variable {name!r}: {why}")
    return out


def _value_problem(p: PublicVar, value: str) -> str | None:
    kind = p.type or "string"
    items: list[str] = [value]
    if kind == "bool":
        if not (is_truthy(value) or is_falsy(value)):
            return f"must be true or false, not {_short(value)}"
    elif kind == "number":
        try:
            n = float(value)
        except ValueError:
            return f"must be a number, not {_short(value)}"
        if not math.isfinite(n):
            return f"must be a finite number, not {_short(value)}"
    elif kind in ("list", "map"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return f"must be a JSON {kind}, not {_short(value)}"
        want = list if kind == "list" else dict
        if not isinstance(parsed, want):
            return f"must be a JSON {kind}, not {_short(value)}"
        if isinstance(parsed, list):
            items = [x if isinstance(x, str) else json.dumps(x) for x in parsed]
    if p.values:
        allowed = set(p.values)
        bad = [x for x in items if x not in allowed]
        if bad:
            return f"{_short(bad[0])} is not one of {', '.join(p.values)}"
    return None


def _short(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


__all__ = ["refusals"]
