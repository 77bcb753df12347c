"""Rules of the house that hold for the whole package, read from its source: no module keeps
state that its functions change (no ``global``, no module-level list or dict filled later, no
patching of another module), and no module imports one that imports it back (lazy imports and
TYPE_CHECKING imports included: a cycle is a design fault even where Python copes with it)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import gclip_cli

PACKAGE = Path(gclip_cli.__file__).parent

# Calls that change the object they are called on.
MUTATING_METHODS = frozenset(
    {
        *("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse"),
        *("update", "setdefault", "popitem", "add", "discard"),
        *("__setitem__", "__delitem__"),
    }
)

# The deliberate exceptions, (module, function): why.  Each must still be found (a stale
# entry would hide a new change of state in the same function).
ALLOWED = {
    ("gclip_cli.cli", "_whole_writes"): "the interpreter's standard streams, set at the edge",
    ("gclip_cli.cli", "_quiet_warnings"): "the interpreter's warning options (for spawned "
    "workers), set at the edge",
    ("gclip_cli.interrupts", "install"): "sys.unraisablehook, the interpreter's hook for it",
}


@dataclass(frozen=True)
class Change:
    """A function that changes state beyond its own: *what*, at *line*."""

    module: str
    function: str
    line: int
    what: str


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """The modules of the package in *package_dir*, by dotted name."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module *name* imports, wherever in it (at the top, inside
    functions, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(package, node)
            found |= {_imported(target, alias.name, modules) for alias in node.names}
    return found - {name, None}


def _absolute(package: str, node: ast.ImportFrom) -> str:
    """The module ``from ... import`` names, in *package*, by its full name."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imported(target: str, name: str, modules: dict[str, Path]) -> str | None:
    """What ``from target import name`` imports of the package: the submodule *name* if
    there is one, else *target* (None for a compiled submodule, which imports nothing)."""
    if f"{target}.{name}" in modules:
        return f"{target}.{name}"
    folder = modules[target].parent if target in modules else None
    if folder is not None and any(folder.glob(f"{name}.*")):
        return None  # an extension module (gclip_cli._kernels)
    return target if target in modules else None


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(package_dir, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others."""
    reach = {name: _reachable(graph, name) for name in graph}
    groups = {
        frozenset({name, *(other for other in reach[name] if name in reach[other])})
        for name in graph
        if name in reach[name]
    }
    return sorted(sorted(group) for group in groups)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph.get(name, ())
    return seen


def state_changes(source: str, module: str) -> list[Change]:
    """Where functions of *source* change what lives beyond them: ``global`` statements, and
    items or attributes of module-level names (their own module's, or modules imported)."""
    finder = _ChangeFinder(module, ast.parse(source))
    finder.visit(finder.tree)
    return finder.found


class _ChangeFinder(ast.NodeVisitor):
    def __init__(self, module: str, tree: ast.Module) -> None:
        self.module, self.tree = module, tree
        self.defined, self.imported = _module_level(tree)
        self.names: list[str] = []  # of the classes and functions around the node
        self.local: list[set[str]] = []  # names local to each function around it
        self.found: list[Change] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        around = self.local[-1] if self.local else set()
        self.names.append(node.name)
        self.local.append(around | _locals(node))
        self.generic_visit(node)
        self.local.pop()
        self.names.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.append(node.name)
        self.generic_visit(node)
        self.names.pop()

    def visit_Global(self, node: ast.Global) -> None:
        self._report(node, f"global {', '.join(node.names)}")

    def visit_Assign(self, node: ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete) -> None:
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            for part in ast.walk(target):
                stored = isinstance(part, (ast.Attribute, ast.Subscript))
                if stored and isinstance(part.ctx, (ast.Store, ast.Del)) and self._outer(part):
                    self._report(node, f"changes {ast.unparse(part)}")
        self.generic_visit(node)

    visit_AugAssign = visit_AnnAssign = visit_Delete = visit_Assign

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in MUTATING_METHODS:
            # a module's function (np.add) changes nothing of the module; its objects might
            of_module = isinstance(func.value, ast.Name) and func.value.id in self.imported
            if self._outer(func.value) and not of_module:
                self._report(node, f"calls {ast.unparse(func)}")
        elif _sets_attributes(node) and self._outer(node.args[0]):
            self._report(node, f"{ast.unparse(func)} on {ast.unparse(node.args[0])}")
        self.generic_visit(node)

    def _outer(self, node: ast.expr) -> bool:
        """Whether *node*, inside a function, is (part of) a module-level name's object."""
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return (
            bool(self.local)
            and isinstance(node, ast.Name)
            and node.id in self.defined | self.imported
            and node.id not in self.local[-1]
        )

    def _report(self, node: ast.stmt | ast.expr, what: str) -> None:
        if self.local:
            self.found.append(Change(self.module, ".".join(self.names), node.lineno, what))


def _sets_attributes(call: ast.Call) -> bool:
    """Whether *call* is setattr(x, ...) or delattr(x, ...)."""
    func = call.func
    return isinstance(func, ast.Name) and func.id in {"setattr", "delattr"} and bool(call.args)


def _module_level(tree: ast.Module) -> tuple[set[str], set[str]]:
    """The names a module defines at its top level (outside functions and classes), and the
    names it imports there."""
    defined, imported = set(), set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).partition(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        else:
            defined |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and _stored(n)}
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    return defined, imported


def _locals(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The names local to *function* (its parameters, what it binds), less those it declares
    global."""
    arguments = function.args
    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
    names = {a.arg for a in every}
    declared_global = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and _stored(node):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).partition(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Lambda):
            names |= {a.arg for a in node.args.args}
        elif isinstance(node, ast.Global):
            declared_global.update(node.names)
    return names - declared_global


def _stored(name: ast.Name) -> bool:
    return isinstance(name.ctx, (ast.Store, ast.Del))


def package_state_changes() -> list[Change]:
    return [
        change
        for module, path in module_names(PACKAGE, "gclip_cli").items()
        for change in state_changes(path.read_text(), module)
    ]


# --- the package ---------------------------------------------------------------------------------


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles(import_graph(PACKAGE, "gclip_cli")) == []


def test_no_function_changes_module_level_state():
    found = package_state_changes()
    unexpected = [c for c in found if (c.module, c.function) not in ALLOWED]
    assert unexpected == []


def test_every_exception_allowed_is_still_needed():
    found = {(c.module, c.function) for c in package_state_changes()}
    assert set(ALLOWED) - found == set()


# --- the checks themselves -----------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


@pytest.mark.parametrize(
    ("files", "cycles"),
    [
        ({"a.py": "from . import b\n", "b.py": "X = 1\n"}, []),
        ({"a.py": "from .b import X\n", "b.py": "from .a import Y\n"}, [["pkg.a", "pkg.b"]]),
        (  # through a third module, and only for type checkers
            {
                "a.py": "from . import b\n",
                "b.py": "from .c import Z\n",
                "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from .a import X\n",
            },
            [["pkg.a", "pkg.b", "pkg.c"]],
        ),
        (  # a lazy import inside a function, and a subpackage importing its parent's module
            {
                "a.py": "def f():\n    from .sub import m\n",
                "sub/__init__.py": "",
                "sub/m.py": "from .. import a\n",
            },
            [["pkg.a", "pkg.sub.m"]],
        ),
        (  # a package importing its submodule, which imports a sibling: no cycle
            {
                "sub/__init__.py": "from .m import X\n",
                "sub/m.py": "from . import n\n",
                "sub/n.py": "",
            },
            [],
        ),
    ],
)
def test_import_cycles_are_found_whatever_the_import(tmp_path, files, cycles):
    assert import_cycles(import_graph(write_package(tmp_path, files), "pkg")) == cycles


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("_listener = None\ndef listen(f):\n    global _listener\n    _listener = f\n", "global"),
        ("_seen = []\ndef note(x):\n    _seen.append(x)\n", "calls _seen.append"),
        ("_cache = {}\ndef put(k, v):\n    _cache[k] = v\n", "changes _cache[k]"),
        ("_cache = {}\ndef drop(k):\n    del _cache[k]\n", "changes _cache[k]"),
        ("import zipfile\ndef patch(f):\n    zipfile.crc32 = f\n", "changes zipfile.crc32"),
        ("import zipfile\ndef patch(f):\n    a, zipfile.crc32 = 1, f\n", "changes zipfile.crc32"),
        ("import sys\ndef quiet():\n    sys.warnoptions.append('x')\n", "calls sys.warnoptions"),
        ("import sys\ndef swap(s):\n    setattr(sys, 'stdout', s)\n", "setattr on sys"),
        ("class R:\n    items = []\ndef add(x):\n    R.items.append(x)\n", "calls R.items"),
        ("N = [0]\nclass C:\n    def bump(self):\n        N[0] += 1\n", "changes N[0]"),
        ("if True:\n    S = set()\ndef f(x):\n    S.add(x)\n", "calls S.add"),
    ],
)
def test_changes_of_module_level_state_are_found(source, what):
    found = state_changes(source, "m")
    assert len(found) == 1 and found[0].what.startswith(what)


@pytest.mark.parametrize(
    "source",
    [
        "_seen = []\ndef note(x):\n    _seen = [x]\n    _seen.append(x)\n",  # its own, local
        "import numpy as np\ndef f(a, b):\n    return np.add(a, b, out=a)\n",
        "TABLE = {}\nTABLE['x'] = 1\n",  # made at import, not changed later
        "def f(items):\n    items.append(1)\n",
        "def outer():\n    seen = []\n    def inner(x):\n        seen.append(x)\n",
        "class C:\n    def __init__(self):\n        self.items = []\n        self.items.pop()\n",
    ],
)
def test_state_of_a_function_or_object_of_its_own_is_not_flagged(source):
    assert state_changes(source, "m") == []


def test_the_changes_found_name_their_function():
    source = "import zipfile\nclass A:\n    def patch(self):\n        zipfile.x = 1\n"
    assert state_changes(source, "m") == [Change("m", "A.patch", 4, "changes zipfile.x")]
