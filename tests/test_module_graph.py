"""The package's module graph: no import circles, no upward imports, no private names across modules.

Layers, bottom to top: the library (everything not named below) < ``prefjax.report`` and
``prefjax.experiments`` < ``prefjax.pipeline``. A module may import only from its own layer or
below; the report and the experiments do not import each other. Every ``import`` statement counts,
at module top or inside a function.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "prefjax")

# No known exceptions: the moe <-> moe_pallas circle and the private family registry are gone.
KNOWN_CIRCLES: list[set[str]] = []
KNOWN_PRIVATE: set[tuple[str, str]] = set()
# Modules that must have every import at their top (no function-level imports).
TOP_IMPORTS_ONLY = ("prefjax.pipeline", "prefjax.runconfig", "prefjax.stages", "prefjax.baselines",
                    "prefjax.experiments.steering", "prefjax.experiments.patching",
                    "prefjax.experiments.pref_shift", "prefjax.experiments.truefalse", "prefjax.report.build")


def _modules(pkg_dir=PKG) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(pkg_dir):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                name = os.path.relpath(p, os.path.dirname(pkg_dir))[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def import_graph(mods: dict[str, str]):
    """``(edges, private, nested)``: module -> imported prefjax modules; ``(module, name)`` of private
    names imported from another module; ``(module, line)`` of imports inside a function or class."""
    edges = {m: set() for m in mods}
    private, nested = [], []
    for m, p in mods.items():
        tree = ast.parse(open(p, encoding="utf-8").read(), p)
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "prefjax"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "prefjax":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.append(sub if sub in mods else node.module)
                    if a.name.startswith("_") and sub not in mods:
                        private.append((m, f"{node.module}.{a.name}"))
            if targets and id(node) not in top and not _in_type_checking(tree, node):
                nested.append((m, node.lineno))
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges, private, nested


def _in_type_checking(tree, node) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test) and node in list(ast.walk(n)):
            return True
    return False


def circles(edges) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def layer(module: str) -> str:
    """``pipeline``, ``experiments``, ``report`` or ``library``."""
    if module == "prefjax.pipeline":
        return "pipeline"
    for top in ("experiments", "report"):
        if module == f"prefjax.{top}" or module.startswith(f"prefjax.{top}."):
            return top
    return "library"


ALLOWED = {"library": {"library"}, "experiments": {"library", "experiments"}, "report": {"library", "report"},
           "pipeline": {"library", "experiments", "report", "pipeline"}}


def upward(edges) -> list[str]:
    """``"a -> b"`` for every import of a module from a layer above (or beside) the importer's."""
    return sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer(t) not in ALLOWED[layer(m)])


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    assert "prefjax.pipeline" in mods and "prefjax.experiments.steering" in mods
    return mods, import_graph(mods)


def test_no_import_circles(graph):
    _, (edges, _, _) = graph
    found = [c for c in circles(edges) if c not in KNOWN_CIRCLES]
    assert not found, f"import circles: {found}"


def test_no_upward_imports(graph):
    _, (edges, _, _) = graph
    assert not upward(edges), "imports from a layer above the importer's:\n" + "\n".join(upward(edges))
    # the pipeline is the only module that imports the experiments
    assert {m for m, ts in edges.items() for t in ts if layer(t) == "experiments" and layer(m) != "experiments"} \
        == {"prefjax.pipeline"}


def test_no_private_names_across_modules(graph):
    _, (_, private, _) = graph
    private = [p for p in private if p not in KNOWN_PRIVATE]
    assert not private, f"private names imported from another module: {private}"


def test_imports_at_module_top(graph):
    _, (_, _, nested) = graph
    bad = [(m, line) for m, line in nested if m in TOP_IMPORTS_ONLY]
    assert not bad, f"imports inside functions: {bad}"


def test_checker_finds_circles_and_upward_imports(tmp_path):
    """The checks above can fail: a planted circle and an upward import are found."""
    pkg = tmp_path / "prefjax"
    (pkg / "experiments").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from prefjax import b\n")
    (pkg / "b.py").write_text("def f():\n    from prefjax.a import _hidden\n")
    (pkg / "experiments" / "__init__.py").write_text("")
    (pkg / "experiments" / "x.py").write_text("import prefjax.a\n")
    (pkg / "c.py").write_text("from prefjax.experiments.x import thing\n")
    mods = _modules(str(pkg))
    edges, private, nested = import_graph(mods)
    assert circles(edges) == [{"prefjax.a", "prefjax.b"}]
    assert upward(edges) == ["prefjax.c -> prefjax.experiments.x"]
    assert private == [("prefjax.b", "prefjax.a._hidden")]
    assert nested == [("prefjax.b", 2)]
