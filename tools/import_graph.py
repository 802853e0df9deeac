"""The project's import graph: modules, edges, depth, and the one-way rule of the layers.

    python tools/import_graph.py            # summary + the edges that break the rule
    python tools/import_graph.py --edges    # every edge too

Modules are the tracked ``*.py`` files of the top level and of the two wings (``knowledge/``,
``shapes_ov/``); an edge is an ``import``/``from`` of another such module anywhere in the file
but under ``if TYPE_CHECKING:`` (annotations only: nothing runs), read with ``ast``, nothing is
imported. Depth is the longest import chain, counted in modules. The rule (issue 21): the model
layer (``MODEL_LAYER``) and the run module (``rundir``) import no wing. Exit status 1 when it is
broken or there is a cycle; tests/test_layers.py holds it.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINGS = ("knowledge", "shapes_ov")
MODEL_LAYER = {"config", "box_ops", "detector", "distill", "adamixer", "query_generator", "hdovd"}
NO_WINGS = MODEL_LAYER | {"rundir"}  # the modules the wings build on


def modules(repo: Path = REPO) -> dict[str, Path]:
    """{dotted name: path} of the top-level and wing modules (``__main__`` files excluded)."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout.split()
    out = {}
    for f in files:
        parts = Path(f).with_suffix("").parts
        if len(parts) == 1 or (len(parts) == 2 and parts[0] in WINGS and parts[1] != "__main__"):
            name = ".".join(p for p in parts if p != "__init__")
            out[name] = repo / f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The known modules ``path`` imports (``from knowledge import x`` counts as knowledge.x)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph(repo: Path = REPO) -> dict[str, set[str]]:
    mods = modules(repo)
    g = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    for m in g:  # a wing's package __init__ is reached through its modules, not an edge of its own
        g[m] -= {w for w in WINGS if any(d.startswith(w + ".") for d in g[m])}
    return g


def depth(g: dict[str, set[str]]) -> int:
    """Longest chain of imports, in modules (raises RecursionError-free ValueError on a cycle)."""
    @lru_cache(maxsize=None)
    def longest(m: str, stack: tuple = ()) -> int:
        if m in stack:
            raise ValueError(f"import cycle: {' -> '.join(stack + (m,))}")
        return 1 + max((longest(d, stack + (m,)) for d in g[m]), default=0)
    return max(longest(m) for m in g)


def violations(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(model-layer or run module, wing module it imports) pairs."""
    return sorted((m, d) for m, ds in g.items() if m in NO_WINGS for d in ds
                  if d.split(".")[0] in WINGS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    g = graph()
    if args.edges:
        for m in sorted(g):
            print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
    try:
        d = depth(g)
    except ValueError as e:
        print(e)
        return 1
    bad = violations(g)
    print(f"modules {len(g)}, edges {sum(map(len, g.values()))}, depth {d}")
    for m, w in bad:
        print(f"model layer imports a wing: {m} -> {w}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
