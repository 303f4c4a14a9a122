"""The folder tree is the design (README, "Layout"): utils/ is five layers, and a module imports only
modules of its own layer or of lower ones, also inside a function. Checked statically from the source
(every `import` and `from ... import` anywhere in a module, function-local ones included), and by
importing every module alone in a fresh interpreter."""
import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LAYERS = ("runtime", "soup", "files", "archs", "run")   # lowest first
# The one circle allowed: the architecture plug-ins register with the registry, which imports them.
REGISTRY = "utils.archs"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def utils_modules():
    return {module_name(p): p for p in sorted((ROOT / "utils").rglob("*.py"))}


def imported(path, modules):
    """The utils modules (and packages) that `path` imports, wherever in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from utils.<package> import <name>`: <name> may be a module of that package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "utils" or t.startswith("utils.") or t.startswith("datasets"))
    found.discard(name)
    return found


def graph():
    modules = utils_modules()
    return {name: imported(path, modules) for name, path in modules.items()}


def layer(name):
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_of_utils_is_in_a_layer():
    loose = [n for n in utils_modules() if n != "utils" and layer(n) is None]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_module_imports_a_higher_layer_or_datasets():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if dep.startswith("datasets"):
                wrong.append(f"{name} imports {dep} (utils never imports datasets)")
            elif dep == "utils":
                wrong.append(f"{name} imports the utils package itself")
            elif layer(dep) is not None and layer(dep) > layer(name) and not (
                    name.startswith(REGISTRY + ".") and dep == REGISTRY):
                wrong.append(f"{name} ({LAYERS[layer(name)]}) imports {dep} ({LAYERS[layer(dep)]})")
    assert not wrong, "\n".join(wrong)


def test_the_soup_math_imports_nothing_else_of_utils():
    outside = {name: sorted(d for d in deps if layer(d) != LAYERS.index("soup"))
               for name, deps in graph().items() if layer(name) == LAYERS.index("soup")}
    assert not any(outside.values()), outside


def find_cycle(edges):
    """A cycle of `edges` (name -> set of names) as a list, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_utils_modules():
    edges = {name: {d for d in deps if d in graph_modules()} for name, deps in graph().items()}
    # the registry and its plug-ins: the one circle allowed
    for name in edges:
        if name.startswith(REGISTRY + "."):
            edges[REGISTRY].discard(name)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def graph_modules():
    return set(utils_modules())


IMPORT_ALONE = """
import importlib, os, sys, traceback
import numpy, PIL, torch, torchvision, tqdm  # third-party only: each child starts with no module of utils
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", *failed)
"""


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module of utils/ is imported alone: in a process forked from an interpreter that has imported
    the third-party libraries but nothing of utils (so a module that works only after another one was
    imported, or only in some order, fails here)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *sorted(utils_modules())], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = done.stdout.strip().splitlines()[-1].split()[1:]
    assert not failed, (failed, done.stderr[-3000:])
