"""The house's rules, read from the source with `ast` (no import, well under a second): no import
circle in gpt_train (deferred imports count), the foundation modules stay at the bottom, the
model knows nothing of settings or optimizers, and the loop takes what kind of start it is from
the start decision instead of reading the settings that decide it.

Change a rule here only on purpose, with the reason beside it.
"""
import ast
import functools
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt_train")

# The foundation: what each may import of its siblings. Everything else may build on them.
FOUNDATION = {
    "launch": set(),  # how the process was launched: read by errors, so below it
    "signals": set(),
    "loss": set(),  # a loss function on tensors
    "errors": {"launch"},  # the one user-error type and the entry point's exit
    "files": {"errors"},  # atomic writes and write failures
    "config": {"errors"},  # the settings: every module may read them, they read nothing above
    "cli": {"config", "errors"},  # the parser: the commands that dispatch live in gpt_train.commands
}
# Modules that must not know a sibling: what a model is does not depend on how it is trained.
FORBIDDEN = {
    "model": {"config", "optim"},
    # a storage backend moves files: it knows nothing of what they hold or how they were trained
    "store": {"config", "model", "optim", "train", "start", "checkpoint", "data", "stream"},
}
# Settings that decide what kind of start a run is: gpt_train.start reads them, the loop reads its answer.
START_SETTINGS = {"eval_only", "init_from", "resume_from_checkpoint", "overwrite_output_dir"}


def _modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def _tree(module):
    with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def sibling_imports(module, modules):
    """Every gpt_train module `module` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.module == "gpt_train":
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt_train."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gpt_train.")}
    return found - {module}


@functools.cache
def import_graph():
    modules = set(_modules())
    return {module: sibling_imports(module, modules) for module in modules}


def circles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_circles_are_found_where_they_exist():
    # the rule's own check: a graph with a circle through deferred imports is caught
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_foundation_modules_import_only_what_they_may(module):
    graph = import_graph()
    assert graph[module] <= FOUNDATION[module], f"{module} imports {sorted(graph[module] - FOUNDATION[module])}"


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_modules_do_not_know_what_they_must_not(module):
    assert not import_graph()[module] & FORBIDDEN[module]


def test_the_loop_reads_no_start_setting():
    read = {node.attr for node in ast.walk(_tree("train")) if isinstance(node, ast.Attribute)}
    assert not read & START_SETTINGS, f"train.py reads {sorted(read & START_SETTINGS)}: ask gpt_train.start"


def test_every_module_is_named_where_things_are_decided():
    with open(os.path.join(os.path.dirname(PACKAGE), "docs", "configuration.md"), encoding="utf-8") as f:
        page = f.read()
    table = page[page.index("## Where things are decided"):]
    missing = [m for m in _modules() if m != "__init__" and f"gpt_train/{m}.py" not in table]
    assert not missing, f"docs/configuration.md's 'Where things are decided' does not name {missing}"
