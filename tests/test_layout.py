"""The package's shape, as README's "How the code is laid out" states it: imports go one way between the
folders, no module imports itself back, no command imports another, and an import inside a function is one of
the few kinds that keep torch and matplotlib out of the commands that do not need them."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "lora2gguf"
# A folder (or top-level module) may import those of a lower rank only.
RANK = {"errors": 0, "allocator": 0, "fileio": 1, "models": 1, "llamacpp": 2, "weights": 2, "adapters": 3, "parity": 4,
        "training": 4, "commands": 5, "demo": 6, "cli": 7}


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(f: Path, inner: bool | None = None) -> list[tuple[ast.stmt, str]]:
    """(node, imported lora2gguf module) for every import of f, outside `if TYPE_CHECKING:` blocks; inner=True:
    only those inside functions, False: only module-level ones."""
    tree = ast.parse(f.read_text())
    typing_only = {id(n) for top in tree.body if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
                   for n in ast.walk(top)}
    module_level = {id(n) for n in tree.body}
    mods, out = modules(), []
    for n in ast.walk(tree):
        if not isinstance(n, (ast.Import, ast.ImportFrom)) or id(n) in typing_only:
            continue
        if inner is not None and (id(n) not in module_level) != inner:
            continue
        if isinstance(n, ast.Import):
            out += [(n, a.name) for a in n.names]
        else:
            assert n.level == 0, f"{f}: relative import (the package imports absolutely)"
            out += [(n, f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in mods else n.module) for a in n.names]
    return out


def folder(module: str) -> str:
    return module.split(".")[1]


def test_folders_import_downwards_only():
    for name, f in modules().items():
        if name == "lora2gguf":
            continue
        for _, dep in imports(f):
            if dep.startswith("lora2gguf.") and folder(dep) != folder(name):
                assert RANK[folder(dep)] < RANK[folder(name)], f"{name} imports {dep}"


def test_no_import_circles():
    mods = modules()
    graph = {m: {d for _, d in imports(f) if d in mods and d != m and not m.startswith(d + ".")} for m, f in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import circle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_command_imports_another():
    for name, f in modules().items():
        if name.startswith("lora2gguf.commands."):
            others = [d for _, d in imports(f) if d.startswith("lora2gguf.commands.")]
            assert not others, f"{name} imports {others}"


def test_imports_inside_functions_are_the_lazy_kinds():
    """Torch (or one of our modules built on it) where the module must also serve torch-free commands,
    matplotlib (optional), an architecture's PyTorch layers (its forward), and the CLI's per-command imports
    (start-up time)."""
    mods = modules()
    on_torch = {n for n, f in mods.items() if any(d.split(".")[0] == "torch" for _, d in imports(f, inner=False))}
    for name, f in mods.items():
        for node, dep in imports(f, inner=True):
            lazy = (dep.split(".")[0] in ("torch", "matplotlib") or dep == "lora2gguf.models.layers" or dep in on_torch
                    or (name == "lora2gguf.cli" and dep.startswith(("lora2gguf.commands.", "lora2gguf.demo"))))
            assert lazy, f"{f}:{node.lineno}: import of {dep} inside a function"
