"""Draw a function's dataflow graph with graphviz: one node per op (name + result types), one per argument."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import graphviz

from r1c.ir.core import Function, Module, Op, Value

FORMATS = ("svg", "png", "pdf", "dot")


class VizError(ValueError):
    pass


@dataclass
class Drawing:
    graph: graphviz.Digraph
    shown_ops: int
    total_ops: int

    @property
    def truncated(self) -> bool:
        return self.shown_ops < self.total_ops


def _node(g: graphviz.Digraph, node: str, op: Op) -> None:
    if op.name == "param":
        g.node(node, f"param @{op.attrs['name']}\n{op.result.type}", fillcolor="lightyellow")
    else:
        g.node(node, f"{op.name}\n{', '.join(str(r.type) for r in op.results)}")


def _locs(ops: list[tuple[str, Op]], f: Function) -> dict[str, str]:
    """Location of each drawn op; a param (which has no loc) is drawn next to its first user."""
    users = f.users()
    locs: dict[str, str] = {}
    for node, op in ops:
        loc = op.loc
        if op.name == "param" and users.get(op.result):
            loc = users[op.result][0].loc
        locs[node] = loc or ""
    return locs


def _add_clusters(
    g: graphviz.Digraph, nodes: dict[str, str], ops: dict[str, Op], depth: int, counter: list[int]
) -> None:
    """Nested subgraph per loc component, so model.layers.3.self_attn sits inside model.layers.3."""
    here = [n for n, loc in nodes.items() if len(loc.split(".")) <= depth or not loc]
    children: dict[str, dict[str, str]] = {}
    for n, loc in nodes.items():
        if n in here:
            continue
        children.setdefault(".".join(loc.split(".")[: depth + 1]), {})[n] = loc
    for n in here:
        _node(g, n, ops[n])
    for child, members in children.items():
        counter[0] += 1
        with g.subgraph(name=f"cluster_{counter[0]}") as sub:
            sub.attr(label=child, style="rounded", color="gray50")
            _add_clusters(sub, members, ops, depth + 1, counter)


def draw(m: Module, function: str | None = None, cluster_by_loc: bool = False, max_ops: int | None = None) -> Drawing:
    f = m.functions[function] if function else m.main
    if max_ops is not None and max_ops < 1:
        raise VizError(f"--max-ops must be >= 1, got {max_ops}")
    shown = f.body if max_ops is None else f.body[:max_ops]
    g = graphviz.Digraph(
        name=f"{m.name}.{f.name}",
        graph_attr={"rankdir": "TB", "fontname": "Helvetica"},
        node_attr={
            "shape": "box",
            "style": "rounded,filled",
            "fillcolor": "white",
            "fontname": "Helvetica",
            "fontsize": "10",
        },
    )
    source: dict[Value, str] = {}
    for i, a in enumerate(f.args):
        source[a] = f"arg{i}"
        g.node(f"arg{i}", f"%{a.name}\n{a.type}", shape="ellipse", fillcolor="lightblue")
    ops = [(f"op{i}", op) for i, op in enumerate(shown)]
    if cluster_by_loc:
        _add_clusters(g, _locs(ops, f), dict(ops), 0, [0])
    else:
        for node, op in ops:
            _node(g, node, op)
    for node, op in ops:
        for v in op.operands:
            g.edge(source[v], node)
        for r in op.results:
            source[r] = node
    if len(shown) < len(f.body):
        g.node("truncated", f"... {len(f.body) - len(shown)} more ops not drawn", shape="note", fillcolor="lightgray")
    else:
        for i, r in enumerate(f.results):
            g.node(f"ret{i}", f"return %{r.name}\n{r.type}", shape="ellipse", fillcolor="lightblue")
            g.edge(source[r], f"ret{i}")
    return Drawing(g, len(shown), len(f.body))


def render(drawing: Drawing, path: str | Path) -> Path:
    """Write .dot source, or render .svg/.png/.pdf with the `dot` program."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise VizError(f"cannot write {path.name}: output must end in {', '.join('.' + f for f in FORMATS)}")
    if fmt == "dot":
        path.write_text(drawing.graph.source)
        return path
    try:
        path.write_bytes(drawing.graph.pipe(format=fmt))
    except graphviz.ExecutableNotFound:
        raise VizError(
            "graphviz's `dot` program is not installed; write a .dot file instead or install graphviz"
        ) from None
    return path


__all__ = ["Drawing", "VizError", "draw", "render"]
