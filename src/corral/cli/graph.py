"""``corral template graph -o svg``: a plan's channel graph as an SVG picture, laid out
here, with no Graphviz installed.

The layout is grandalf's (a pure-Python Sugiyama layered layout, pinned in
pyproject.toml): tasks in layers from left to right in the direction data flows, each
connected part of the graph below the previous one. Tasks are boxes labelled with
their path (without the workflow's name, so that ``flp1.readout`` and
``flp2.readout`` stay apart); an address outside the plan is an ellipse; each connect
is an arrow from the side that sends to the side that receives, labelled with its
channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from corral.model.plan import Plan

CHAR = 7.0  # the width of a character of the 12 px font, about
HEIGHT = 28.0  # a box's height
PAD = 12.0  # a box's padding, left and right
GAP = 40.0  # between two connected parts of the graph


def edges(plan: Plan) -> tuple[list[tuple[str, str, str]], set[str]]:
    """Each connect as (from, to, label), in the direction data flows; and the
    addresses outside the plan that some connect names."""
    out: list[tuple[str, str, str]] = []
    outside: set[str] = set()
    for c in plan.connects:
        other = c.bind_task
        other_chan = c.bind_name or ""
        if other is None:
            other = c.address or c.target
            outside.add(other)
        sends = c.type in ("push", "pub")
        a, b = (c.task, other) if sends else (other, c.task)
        ends = (c.name, other_chan) if sends else (other_chan, c.name)
        label = ends[0] if ends[0] == ends[1] or not ends[1] else "→".join(ends)
        out.append((a, b, label))
    return out, outside


class _Box:
    """What grandalf lays out: a node's size (w, h) and, once laid out, its centre."""

    def __init__(self, w: float, h: float) -> None:
        self.w = w
        self.h = h
        self.xy = (0.0, 0.0)


class _Route:
    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def setpath(self, points: list[Any]) -> None:
        self.points = [(float(x), float(y)) for x, y in points]


def _centre(v: Any, at: Any) -> tuple[float, float, float, float]:
    """A laid-out vertex's centre, width and height, turned."""
    x, y = at(*v.view.xy)
    return x, y, v.view.h, v.view.w


def _far(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2


def _clip(
    box: tuple[float, float, float, float], toward: tuple[float, float]
) -> tuple[float, float]:
    """Where the line from the box's centre toward a point leaves the box."""
    cx, cy, w, h = box
    dx, dy = toward[0] - cx, toward[1] - cy
    if dx == 0 and dy == 0:
        return cx, cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    scale = min(scale, 1.0)
    return cx + dx * scale, cy + dy * scale


MAX_SVG_TASKS = 2000  # the layout of 1,000 tasks takes ~1 s, of 10,000 a minute


def to_svg(plan: Plan) -> str:
    from grandalf.graphs import Edge, Graph, Vertex  # type: ignore[import-untyped]
    from grandalf.layouts import SugiyamaLayout  # type: ignore[import-untyped]

    root = plan.name + "."
    tasks = {t.path for t in plan.tasks}
    connects, outside = edges(plan)
    labels: dict[str, str] = {}
    for t in plan.tasks:
        labels[t.path] = t.path[len(root) :] if t.path.startswith(root) else t.path
    for name in sorted(outside - labels.keys()):
        labels[name] = name
    vertices = {name: Vertex(name) for name in labels}
    for name, v in vertices.items():
        # laid out top to bottom, then turned: a box's width is the layout's height
        v.view = _Box(HEIGHT, CHAR * len(labels[name]) + 2 * PAD)
    links = []
    for a, b, label in connects:
        if a == b or a not in vertices or b not in vertices:
            continue
        e = Edge(vertices[a], vertices[b], data=label)
        e.view = _Route()
        links.append(e)
    graph = Graph(list(vertices.values()), links)
    parts: list[str] = []
    top = GAP / 2
    right = 0.0
    for component in graph.C:
        layout = SugiyamaLayout(component)
        layout.xspace, layout.yspace = 20, 70
        layout.init_all()
        layout.draw()
        vs = list(component.sV)
        # turned: the layout's y is our x (left to right), its x our y
        xs = [v.view.xy[1] - v.view.h / 2 for v in vs]
        ys = [v.view.xy[0] - v.view.w / 2 for v in vs]
        dx, dy = GAP / 2 - min(xs), top - min(ys)
        bottom = top

        def at(x: float, y: float, dx: float = dx, dy: float = dy) -> tuple[float, float]:
            return y + dx, x + dy

        for e in component.sE:
            if not isinstance(getattr(e, "view", None), _Route):
                continue
            pts = [at(x, y) for x, y in e.view.points]
            if len(pts) < 2:
                continue
            src, dst = (_centre(e.v[0], at), _centre(e.v[1], at))
            if _far(pts[0], src[:2]) > _far(pts[-1], src[:2]):
                pts.reverse()  # (an edge the layout turned round, to break a cycle)
            pts[0] = _clip(src, pts[1])
            pts[-1] = _clip(dst, pts[-2])
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline class="edge" points="{path}" marker-end="url(#arrow)"/>')
            (x0, y0), (x1, y1) = pts[len(pts) // 2 - 1], pts[len(pts) // 2]
            if e.data:
                parts.append(
                    f'<text class="label" x="{(x0 + x1) / 2:.1f}" y="{(y0 + y1) / 2 - 4:.1f}">'
                    f"{escape(str(e.data))}</text>"
                )
        for v in vs:
            cx, cy = at(*v.view.xy)
            w, h = v.view.h, v.view.w
            bottom = max(bottom, cy + h / 2)
            right = max(right, cx + w / 2)
            name = str(v.data)
            shape = (
                f'<ellipse cx="{cx:.1f}" cy="{cy:.1f}" rx="{w / 2:.1f}" ry="{h / 2:.1f}"/>'
                if name in outside and name not in tasks
                else f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" '
                f'height="{h:.1f}" rx="4"/>'
            )
            parts.append(
                f'<g class="node" id={quoteattr(name)}><title>{escape(name)}</title>{shape}'
                f'<text x="{cx:.1f}" y="{cy + 4:.1f}">{escape(labels[name])}</text></g>'
            )
        top = bottom + GAP
    width, height = right + GAP / 2, max(top - GAP / 2, GAP)
    style = (
        "text{font:12px sans-serif;text-anchor:middle}"
        ".node rect,.node ellipse{fill:#f4f6fb;stroke:#34495e}"
        ".edge{fill:none;stroke:#566573}.label{font-size:10px;fill:#566573}"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">\n'
        f"<title>{escape(plan.name)}</title>\n<style>{style}</style>\n"
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#566573"/>'
        "</marker></defs>\n" + "\n".join(parts) + "\n</svg>\n"
    )
