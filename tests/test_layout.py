"""The package's layers: imports flow one way (bottom to top) and there is no import cycle.

Every import counts, also those inside functions and under ``if TYPE_CHECKING``: a cycle broken only by a
function-level import is still a cycle. A new module must be given a layer here (README, "Layout").
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import from its own layer and the layers below it, never from one above.
LAYERS = [
    ("base", ("edmkit.config", "edmkit.dist", "edmkit.runtime", "edmkit.files")),
    ("nn", ("edmkit.nn",)),
    ("diffusion", ("edmkit.diffusion",)),
    ("data", ("edmkit.data",)),
    ("latent", ("edmkit.latent",)),  # encoders between images and what the network sees (pixels, VAEs)
    ("presets", ("edmkit.presets",)),  # resolving flags counts the data's classes
    ("checkpoint", ("edmkit.checkpoint",)),
    ("interop", ("edmkit.interop",)),  # reading other projects' network files (NVIDIA's EDM / EDM2 pickles)
    ("sampling", ("edmkit.sampling",)),
    ("metrics", ("edmkit.metrics",)),
    ("training", ("edmkit.training",)),
    ("report", ("edmkit.report",)),
    ("cli", ("edmkit.cli", "edmkit.__main__")),
    ("api", ("edmkit",)),  # edmkit/__init__.py: the public Python API, on top of everything
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "edmkit").rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix (``edmkit`` alone only for the package's own __init__)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix if prefix == "edmkit" else module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layout.py and to the README's Layout")
    return best


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported edmkit module, line) for every import statement anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "edmkit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "edmkit":
                continue
            for a in node.names:  # `from edmkit.pkg import submodule` imports the submodule itself
                out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {m: [(t, line) for t, line in imports_of(m, p, known) if t != m] for m, p in known.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_module_imports_from_a_layer_above_it():
    known = modules()
    upward = []
    for m, targets in graph().items():
        for target, line in targets:
            if layer_of(target) > layer_of(m):
                upward.append(f"{known[m].relative_to(SRC.parent)}:{line}: {m} ({LAYERS[layer_of(m)][0]}) imports "
                              f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(edges):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(edges.get(root, ()))))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return None


def test_there_is_no_import_cycle():
    known = modules()
    edges = {m: sorted({t for t, _ in targets if t in known}) for m, targets in graph().items()}
    edges["edmkit"] = []  # the API module imports everything lazily by design; nothing may import it back (checked above)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder and the layer lookup on hand-made cases, so a broken checker cannot pass silently."""
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert layer_of("edmkit.nn.unet") < layer_of("edmkit.diffusion.precond") < layer_of("edmkit.training.loop")
    assert layer_of("edmkit.config") == 0 and layer_of("edmkit") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("edmkit_other.module")
