"""The house rules of DESIGN.md, held by a test: which package of dynserve may import which, no
import cycle between packages, the kernels depend only on routing's `Assignment`, and the server
and `LLM` use only the engine's public face (`dynserve.engine`'s exports)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUND = {"config", "sampling_params", "tokenizer"}
# package -> the packages it may import (arrows point down; the ground is config, sampling params, tokenizer)
ALLOWED = {
    "config": set(),
    "sampling_params": {"config"},
    "tokenizer": {"config"},
    "routing": GROUND,
    "kernels": {"routing"},
    "model": GROUND | {"routing", "kernels"},
    "engine": GROUND | {"model", "routing"},
    "server": GROUND | {"engine", "dynserve"},
    "llm": GROUND | {"engine"},
    "dynserve": GROUND | {"llm"},  # dynserve/__init__.py
    "cli": GROUND | {"llm", "server", "engine", "bench"},
    "bench": GROUND | {"dynserve", "llm", "engine", "model", "routing", "kernels", "server"},
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "dynserve_kernels":
        return "kernels"
    if parts[0] != "dynserve":
        return None
    return parts[1] if len(parts) > 1 else "dynserve"


def _imports() -> list[tuple[str, str, str]]:
    """(importing file, its package, imported module) for every dynserve import, wherever it sits
    (module level, inside functions, under TYPE_CHECKING)."""
    found = []
    for folder, name in (("dynserve", "dynserve"), ("kernels", "dynserve_kernels")):
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            src = _package(".".join([name, *rel.parts]).removesuffix(".__init__"))
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                elif isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                else:
                    continue
                for m in mods:
                    if _package(m) is not None:
                        found.append((str(f.relative_to(ROOT)), src, m))
    return found


def test_packages_import_only_what_the_design_allows():
    bad = [
        f"{f}: {src} -> {m}"
        for f, src, m in _imports()
        if (dst := _package(m)) != src and dst not in ALLOWED.get(src, set())
    ]
    assert not bad, "imports against DESIGN.md's rules:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for _, src, m in _imports():
        dst = _package(m)
        if dst != src:
            graph[src].add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_kernels_take_plain_contracts():
    """Kernels see tensors, their own AttentionMetadata, and routing's Assignment: nothing else."""
    bad = [f"{f}: {m}" for f, src, m in _imports() if src == "kernels" and m.startswith("dynserve.")]
    bad = [b for b in bad if not b.endswith(": dynserve.routing.base")]
    assert not bad, bad


def test_server_and_llm_use_the_engines_public_face():
    bad = [
        f"{f}: {m}"
        for f, src, m in _imports()
        if src in ("server", "llm", "cli") and _package(m) == "engine" and m != "dynserve.engine"
    ]
    assert not bad, "reaching below dynserve.engine's exports:\n" + "\n".join(bad)


def test_the_rules_see_every_package():
    assert {src for _, src, _ in _imports()} <= set(ALLOWED)
