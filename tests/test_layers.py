"""The import layering of docs/architecture.md, read from the source: ``qwen_image/`` imports nothing of ours,
``rewards/`` and ``annotation/`` nothing of ``align/``, no module of ``align/`` imports one of a higher layer, and
no module imports itself back through others (a cycle). Function-level imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("qwen_image", "rewards", "annotation", "align")
# align/, lowest layer first: a module may import its own layer and the ones below.
ALIGN_LAYERS = [
    ["align.plugins", "align.losses", "align.adapters", "align.lowvram",
     "align.quiet"],  # pure functions and storage helpers; the library-noise filters
    ["align.configs", "align.objectives"],  # options, and the registry of objectives (lazy references only)
    ["align.models", "align.modeling", "align.memory", "align.reference", "align.export",
     "align.checkpoints"],  # model families, set-up, checkpoint manifests
    ["align.data", "align.datatools", "align.evaluation"],  # reading, checking, caching data; evaluations
    ["align.rl"],  # objective-neutral online RL
    ["align.trainers"],  # one Trainer per objective
    ["align.launch", "align.cli", "align.sft", "align.dpo", "align.grpo", "align.nft", "align.awm", "align.dgpo", "align.kto",
     "align.train"],  # launch
    ["align.workflows", "align.demo", "align"],  # the brand-adapter workflow and the demo
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in OURS for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports (resolved to the deepest known module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(name: str) -> int:
    best = (-1, -1)
    for i, prefixes in enumerate(ALIGN_LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best[1]:
                best = (i, len(p))
    assert best[0] >= 0, f"{name} is in no layer of ALIGN_LAYERS: add it (and to docs/architecture.md)"
    return best[0]


def test_leaves_import_nothing_above_them():
    graph = _graph()
    bad = [(m, t) for m, targets in graph.items() for t in targets
           if (m.startswith("qwen_image") and not t.startswith("qwen_image"))
           or (m.split(".")[0] in ("rewards", "annotation") and t.startswith("align"))
           or (m.startswith("annotation") and t.startswith("rewards") and m != "annotation.generate")]
    assert not bad, bad


def test_align_imports_point_down():
    graph = _graph()
    upward = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("align")
              for t in targets if t.startswith("align") and _layer(t) > _layer(m)]
    assert not upward, upward


def test_no_import_cycle():
    graph = _graph()
    # Packages import their own modules in __init__; a module importing its package's __init__ is the usual
    # "from . import X" and is not a cycle of ours: look at module-to-module edges only.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, cycles[:5]
