"""Imports go one way (sources → matcher → engine → executors → records), and each heavy
library has exactly one module that imports it (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "opsrun"

LAYERS: dict[str, int] = {}
for layer, names in enumerate([
    # L0: no opsrun imports beyond these
    "errors exit_codes paths ids terminal_text suggest durations sizes checkpoints",
    # L1: the runbook and plain data
    "yaml_load schema_checks runbook_schema expressions shell_words runbook secrets run_types "
    "event criteria params describe cron globs step_outputs identity completion_scripts "
    "inventory",
    # L2
    "matcher",
    # L3: the world: processes, files, sockets, the store and the audit log
    "proc step_processes file_lock store audit control approvals "
    "sources executors",
    # L4: orchestration
    "engine concurrency run_records resume",
    # L5: the program around it
    "run_setup recovery dispatch daemon daemon_log daemon_sources daemon_control systemd output result",
    # L6: the command line
    "cli commands error_handler __main__ launcher",
]):
    for name in names.split():
        LAYERS[name] = layer

ONLY_IMPORTER = {
    "typer": {"cli"}, "click": {"cli"}, "rich": {"output"}, "yaml": {"yaml_load"},
    "paramiko": {"executors.ssh"}, "watchfiles": {"sources.files"}, "croniter": {"cron"},
    "subprocess": {"proc"}, "sqlite3": {"store"}, "jinja2": {"expressions"},
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
            if node.module == "opsrun":
                found += [f"opsrun.{a.name}" for a in node.names]
    return found


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.get(top)


def test_every_module_has_a_layer() -> None:
    missing = [m for m in modules() if m != "__init__" and layer_of(m) is None]
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
                if imported in ("opsrun.engine", "opsrun.matcher", "opsrun.daemon"):
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
