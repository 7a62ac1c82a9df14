"""Imports go one way (sources → matcher → engine → executors → records), and each heavy
library has exactly one module that imports it (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "opsrun"

LAYERS: dict[str, int] = {}
for layer, names in enumerate([
    # L0: no opsrun imports beyond these
    "errors exit_codes paths ids terminal_text suggest durations sizes checkpoints scratch "
    "digest",
    # L1: the runbook and plain data
    "yaml_load schema_checks runbook_schema expressions shell_words runbook secrets run_types "
    "event criteria params describe cron globs step_outputs identity completion_scripts "
    "throttle_window inventory metrics webhook notify.targets notify.message journal_entries",
    # L2
    "matcher explain",
    # L3: the world: processes, files, sockets, the store and the audit log
    "proc file_lock store audit control_socket approvals sources executors "
    "runs.step_processes runs.driver_lock notify.deliver notify.outbox",
    # L4: orchestration
    "engine flow runs.scheduler runs.recording runs.resume runs.throttle notify.listener",
    # L5: the program around it: a run's context, the service
    "runs.context runs.recovery runs.cancel runs.dispatch service output",
    # L6: the command line
    "cli run_args commands error_handler __main__ launcher",
]):
    for name in names.split():
        LAYERS[name] = layer

ONLY_IMPORTER = {
    "typer": {"cli"}, "click": {"cli"}, "rich": {"output"}, "yaml": {"yaml_load"},
    "paramiko": {"executors.ssh"}, "watchfiles": {"sources.files"}, "croniter": {"cron"},
    "subprocess": {"proc"}, "sqlite3": {"store"}, "jinja2": {"expressions"},
    "aiohttp": {"service.http_listener"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts) or "__init__"] = path
    return out


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # `from opsrun.runs import recovery` imports a module, not only a name
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def layer_of(module: str) -> int | None:
    """The layer of a module: that of its longest listed prefix (`runs.context`, `audit`)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def test_every_module_has_a_layer() -> None:
    missing = [m for m, path in modules().items()
               if path.name != "__init__.py" and layer_of(m) is None]
    assert not missing, f"add these modules to a layer in tests/test_layering.py: {missing}"


def test_imports_go_down_only() -> None:
    wrong = []
    for name, path in modules().items():
        mine = layer_of(name)
        if mine is None:
            continue
        for imported in imports(path):
            if not imported.startswith("opsrun."):
                continue
            target = imported.removeprefix("opsrun.")
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{name} (L{mine}) imports {target} (L{theirs})")
    assert not wrong, "\n".join(wrong)


def test_sources_and_executors_stay_below_the_engine() -> None:
    wrong = []
    for name, path in modules().items():
        if name.startswith(("sources", "executors")):
            for imported in imports(path):
                if imported in ("opsrun.engine", "opsrun.matcher", "opsrun.service.daemon"):
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_one_importer_per_library() -> None:
    wrong = []
    for name, path in modules().items():
        for imported in imports(path):
            lib = imported.split(".")[0]
            allowed = ONLY_IMPORTER.get(lib)
            if allowed is not None and name not in allowed:
                wrong.append(f"{name} imports {lib} (only {', '.join(sorted(allowed))} may)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """Not even between modules of one layer, nor through imports inside functions."""
    known = modules()
    graph = {name: {t.removeprefix("opsrun.") for t in imports(path)
                    if t.removeprefix("opsrun.") in known and t.removeprefix("opsrun.") != name}
             for name, path in known.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(sorted(c)) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["c", "b", "a"]]
