"""The package's folders are layers: a module imports only from its own folder or a lower layer,
stages never import one another, no two modules import each other (imports inside functions and
under TYPE_CHECKING count), and every folder says in its docstring what it may import."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "move_scale"
# lowest first; a module's layer is the longest prefix that names one (the top level: commands)
LAYERS = {
    "move_scale.core": 0,
    "move_scale.config": 1,
    "move_scale.data": 2, "move_scale.kernels": 2,
    "move_scale.data.read": 3,
    "move_scale.data.write": 4,
    "move_scale.models": 5,
    "move_scale.harness": 6,
    "move_scale.stages": 7,
    "move_scale.evaluation": 8,
}
COMMANDS = 9


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "configs" in path.relative_to(PACKAGE).parts:
            continue
        name = ".".join(("move_scale", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                        for alias in node.names}
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> tuple[int, str]:
    """(layer, the folder that names it)."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix], prefix
    return COMMANDS, "move_scale"


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_every_module_belongs_to_a_layer_and_the_top_level_holds_only_commands():
    top = sorted(name for name in MODULES if name.count(".") == 1 and _layer(name)[0] == COMMANDS)
    assert top == ["move_scale.demo", "move_scale.detect", "move_scale.evaluate", "move_scale.export",
                   "move_scale.label", "move_scale.launch", "move_scale.predict", "move_scale.pretrain_mae",
                   "move_scale.shard", "move_scale.train", "move_scale.train_detector",
                   "move_scale.train_selfmask"]


def test_no_module_imports_from_a_higher_layer_and_no_stage_from_another():
    upward = []
    for name, targets in GRAPH.items():
        layer, folder = _layer(name)
        for target in targets:
            target_layer, target_folder = _layer(target)
            if target_layer > layer or (target_layer == layer and target_folder != folder and layer != COMMANDS):
                upward.append(f"{name} -> {target}")
            if _stage(name) and _stage(target) and _stage(name) != _stage(target):
                upward.append(f"{name} -> {target} (one stage into another)")
    assert not upward, "\n".join(sorted(upward))


def test_no_two_modules_import_each_other():
    cycles = []
    for start in GRAPH:
        seen, frontier = set(), [start]
        while frontier:
            for target in GRAPH[frontier.pop()]:
                if target == start:
                    cycles.append(start)
                elif target not in seen:
                    seen.add(target)
                    frontier.append(target)
    assert not sorted(set(cycles))


def test_every_folder_opens_with_what_lives_there_and_what_it_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.splitlines()) >= 3, f"{init}: no docstring that says what lives there"
        assert "May import:" in doc, f"{init}: the docstring does not say what the folder may import"
