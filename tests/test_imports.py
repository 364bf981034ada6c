"""The package's import rules (issue 10), checked on the source with ``ast`` and in a fresh interpreter.

- The core (``invint_hub`` without its ``train`` and ``space`` subpackages) never imports training, the Space,
  ``eval``, ``app``, gradio or accelerate, not even lazily inside a function.
- At module level the core imports only the standard library and its core dependencies (the rest, such as
  ``datasets`` or ``lpips``, only inside the function that needs it), so ``pip install invint_hub`` is enough.
- No import circle between the package's modules; lazy imports count.
- ``eval/`` never imports ``app``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "invint_hub"
NON_CORE = ("invint_hub.train", "invint_hub.space")
FORBIDDEN_IN_CORE = NON_CORE + ("eval", "app", "gradio", "accelerate")
CORE_DEPENDENCIES = {"torch", "torchvision", "huggingface_hub", "safetensors", "PIL", "numpy", "timm"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = set(package_modules())


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in the file, relative ones resolved.

    ``from pkg import name`` yields ``pkg.name`` when that is a module of the package, else ``pkg``.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    # imports inside `if TYPE_CHECKING:` never run
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                sub.type_checking = True  # type: ignore[attr-defined]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "type_checking", False):
            continue
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(alias.name, at_top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((sub if sub in MODULES else mod, at_top))
                if sub not in MODULES and not mod.startswith("invint_hub"):
                    found.append((sub, at_top))  # (third-party: keep the full name for the forbidden-module check)
    return found


def is_core(mod: str) -> bool:
    return not any(mod == p or mod.startswith(p + ".") for p in NON_CORE)


def test_core_never_imports_training_space_eval_app_gradio_or_accelerate():
    bad = []
    for mod, path in package_modules().items():
        if not is_core(mod):
            continue
        for imported, _ in imports_of(path):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_CORE):
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not bad, "the core imports what it must not:\n" + "\n".join(sorted(set(bad)))


def test_core_imports_only_its_dependencies_at_module_level():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for mod, path in package_modules().items():
        if not is_core(mod):
            continue
        for imported, at_top in imports_of(path):
            top = imported.split(".")[0]
            if at_top and top not in stdlib | CORE_DEPENDENCIES | {"invint_hub"}:
                bad.append(f"{path.relative_to(ROOT)} imports {imported} at module level")
    assert not bad, "move these imports into the functions that need them:\n" + "\n".join(sorted(set(bad)))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        mod: {imp for imp, _ in imports_of(path) if imp in modules and imp != mod}
        for mod, path in modules.items()
    }


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_eval_never_imports_app():
    # (eval/results/ holds records of one-off measurements run against old commits, not modules of eval)
    bad = [
        f"{path.relative_to(ROOT)} imports {imp}"
        for path in sorted((ROOT / "eval").rglob("*.py")) if "results" not in path.relative_to(ROOT).parts
        for imp, _ in imports_of(path)
        if imp == "app" or imp.startswith("app.")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_importing_the_core_loads_no_training_or_ui_library():
    # (yaml and tqdm are not checked: huggingface_hub, a core dependency, imports both itself)
    core = sorted(m for m in package_modules() if is_core(m))
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in core)
        + "from invint_hub import InvariancePipeline\n"
        "InvariancePipeline.from_pretrained()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'gradio', 'accelerate', 'datasets', 'app', 'eval'}"
        " or m.startswith(('invint_hub.train', 'invint_hub.space')))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing the core and loading a pipeline loaded: {out.stdout.strip()}"
