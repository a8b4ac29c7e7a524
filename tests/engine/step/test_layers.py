"""The package's layers import downward only: the façade (engine.pipeline) imports the
methods, the methods the step layer, the step layer the models, samplers and runtime --
never the reverse."""

import ast
from pathlib import Path

import engine

ROOT = Path(engine.__file__).parent
# Lower number: lower layer. A module may import its own layer and those below it.
LAYERS = {"models": 0, "sampling": 0, "runtime": 0, "prompts": 0, "images": 0, "loading": 0,
          "step": 1, "editing": 2, "shapes": 3, "pipeline": 3, "loader": 3, "tiny": 3, "cli": 4}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "engine" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _imports(path: Path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                yield mod
                if not node.module:
                    yield from (f"{mod}.{a.name}" for a in node.names)
            else:
                yield node.module


def test_no_module_imports_a_layer_above_it():
    bad = []
    for path in ROOT.rglob("*.py"):
        own = _layer(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if own is None:
            continue
        for mod in _imports(path):
            other = _layer(mod or "")
            if other is not None and other > own:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {mod}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_methods_and_runtime_never_import_the_facade():
    for sub in ("editing", "runtime", "step"):
        for path in (ROOT / sub).rglob("*.py"):
            assert not any(m and m.startswith("engine.pipeline") for m in _imports(path)), path


def test_the_checker_sees_relative_imports():
    mods = set(_imports(ROOT / "editing" / "branches.py")) | set(_imports(ROOT / "editing" / "p2p.py"))
    assert "engine.step" in mods and "engine.models.attention" in mods
