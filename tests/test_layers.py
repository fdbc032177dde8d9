"""The package's shape, read from its source with `ast`: imports go one way, down the layers of
DESIGN.md (top -> model/data/parallel -> store -> generate -> train -> serve -> perf -> commands);
no jaxgpt import hides inside a function; no module imports another's private names; files and
functions stay small enough to read in one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxgpt"

# The top-level modules: the foundation every folder may import.
TOP = {"errors", "files", "cli", "hardware", "config"}
# `python -m jaxgpt.NAME` entry points kept where a module moved into a folder: above everything.
COMMANDS = {"bench", "chat", "convert", "evaluate", "export", "feedback", "launch", "sample",
            "talk", "tokenizer"}
# Folders by layer; a folder imports its own modules and those of lower layers, never a sibling's.
FOLDERS = {"model": 1, "data": 1, "parallel": 1, "store": 2, "generate": 3, "train": 4, "serve": 5,
           "perf": 6}
COMMAND_LAYER = 7
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def place(parts: tuple[str, ...]) -> tuple[str, int]:
    """(unit, layer) of a module given by its dotted parts under jaxgpt: the unit is the folder (or
    the top-level module), which may import itself freely."""
    head = parts[0] if parts else "__init__"
    if head in FOLDERS:
        return head, COMMAND_LAYER if parts[-1] == "__main__" else FOLDERS[head]
    if head in TOP or head == "__init__":
        return "top", 0
    if head in COMMANDS:
        return head, COMMAND_LAYER
    raise KeyError(head)


def modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, tuple(path.relative_to(root).with_suffix("").parts)


def imported(tree: ast.Module, parts: tuple[str, ...], is_package: bool):
    """(node, dotted target parts under jaxgpt, the names taken) of every jaxgpt import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jaxgpt":
                    yield node, tuple(alias.name.split(".")[1:]), []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
            elif node.module and node.module.split(".")[0] == "jaxgpt":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            names = [a.name for a in node.names]
            # `from jaxgpt.data import chat` imports the module jaxgpt.data.chat
            is_module = (not target or target[0] in FOLDERS) and len(target) <= 1
            for name in names:
                yield node, (*target, name) if is_module else target, [name]


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path, parts in modules(root):
        where = f"jaxgpt/{path.relative_to(root)}"
        try:
            unit, layer = place(parts)
        except KeyError:
            found.append(f"{where}: not in a layer (add it to a folder, or to TOP / COMMANDS here)")
            continue
        tree = ast.parse(path.read_text(), str(path))
        top_level = set(map(id, tree.body))
        for node, target, names in imported(tree, parts, path.name == "__init__.py"):
            line = f"{where}:{node.lineno}"
            if id(node) not in top_level:
                found.append(f"{line}: imports jaxgpt.{'.'.join(target)} inside a function")
            try:
                other, other_layer = place(target)
            except KeyError:
                found.append(f"{line}: imports jaxgpt.{'.'.join(target)}, which is in no layer")
                continue
            if other != unit and not other_layer < layer:
                found.append(f"{line}: {unit} (layer {layer}) imports jaxgpt.{'.'.join(target)} "
                             f"({other}, layer {other_layer}): imports go down the layers only")
            private = [n for n in names if n.startswith("_")]
            if private:
                found.append(f"{line}: imports private {', '.join(private)} "
                             f"of jaxgpt.{'.'.join(target)}")
        found += [f"{where}:{n.lineno}: uses private {n.value.id}.{n.attr} of another module"
                  for n in private_uses(tree, module_aliases(tree))]
    return found


def module_aliases(tree: ast.Module) -> set[str]:
    """The local names this module binds to other jaxgpt modules
    (`from jaxgpt.data import chat`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] == "jaxgpt" \
                and (node.module == "jaxgpt" or node.module.split(".")[1] in FOLDERS) \
                and len(node.module.split(".")) <= 2:
            names.update(a.asname or a.name for a in node.names)
    return names


def private_uses(tree: ast.Module, aliases: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            yield node


def sizes(root: Path = PACKAGE) -> list[str]:
    found = []
    for path, _ in modules(root):
        where = f"jaxgpt/{path.relative_to(root)}"
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{where}: {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno}: {node.name} is {n} lines "
                                 f"(at most {MAX_FUNCTION_LINES})")
    return found


def test_imports_go_down_the_layers():
    assert violations() == []


def test_files_and_functions_are_small():
    assert sizes() == []


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text("def f():\n" + body)
    assert sizes(tmp_path) == [f"jaxgpt/long.py:1: f is {MAX_FUNCTION_LINES + 1} lines "
                               f"(at most {MAX_FUNCTION_LINES})"]


def test_config_does_not_import_jax():
    for path, parts in modules(PACKAGE):
        if parts[0] in ("config", "errors", "files"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module or ""])
                    assert not any(n.split(".")[0] in ("jax", "flax", "optax") for n in names), \
                        f"{path.name}:{node.lineno} imports jax"


@pytest.mark.parametrize("source, expected", [
    ("from jaxgpt.train import trainer\n", "model (layer 1) imports jaxgpt.train.trainer"),
    ("def f():\n    from jaxgpt import errors\n", "imports jaxgpt.errors inside a function"),
    ("from jaxgpt.data import sources\n", "model (layer 1) imports jaxgpt.data.sources"),
    ("from jaxgpt.data.tokenizer import _load_hf\n", "imports private _load_hf"),
    ("from jaxgpt.data import chat\nx = chat._assemble\n",
     "uses private chat._assemble of another module"),
])
def test_the_checks_see_what_they_forbid(tmp_path, source, expected):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.py").write_text(source)
    (tmp_path / "errors.py").write_text("")
    assert any(expected in v for v in violations(tmp_path)), violations(tmp_path)


def test_a_module_outside_every_layer_is_named(tmp_path):
    (tmp_path / "stray.py").write_text("")
    assert violations(tmp_path) == ["jaxgpt/stray.py: not in a layer (add it to a folder, or to "
                                    "TOP / COMMANDS here)"]
