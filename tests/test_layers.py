"""The shape of the house (shared/ARCHITECTURE.md, docs/architecture.md), read from the code with `ast`: every module
of src/iopo lives in one layer and imports only layers below it (or its own folder), no import cycle, commands
never import commands, nothing imports another module's `_private` names, the rating page, the plots and the
report never reach torch, and no file grows past ~600 lines. `iopo rate`, `iopo plot` and `iopo report` are also
run, to see that torch is not loaded in fact."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "iopo"
TESTS = Path(__file__).resolve().parent
# The layers, lowest first; a folder's modules (or a top-level module) are in its layer.
LAYERS = {
    "core": 0,
    "config": 1,
    "data": 2,
    "io": 2,
    "engine": 3,
    "eval": 3,
    "online": 4,
    "rate": 4,
    "report": 4,
    "commands": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 6,
}
HEAVY = ("torch", "transformers", "accelerate", "peft", "safetensors")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def folder(name: str) -> str:
    """The top folder (or top-level module) of an iopo module: iopo.engine.fit -> engine, iopo -> __init__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """(imported iopo module, names taken from it, whether the import runs when the module loads) per import;
    `from iopo.x import y` counts as importing iopo.x.y when that is a module. Imports under TYPE_CHECKING never
    run and are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    top_level = set(tree.body)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _under_type_checking(node, parents):
            continue
        at_load = node in top_level
        if isinstance(node, ast.Import):
            found += [(a.name, [], at_load) for a in node.names if a.name.split(".")[0] in ("iopo", *HEAVY)]
        elif node.module and node.level == 0:
            base = node.module
            if base.split(".")[0] not in ("iopo", *HEAVY):
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, [], at_load))
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                found.append((base, plain, at_load))
    return found


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def test_every_module_imports_only_lower_layers_or_its_own_folder():
    wrong = []
    for name, found in GRAPH.items():
        here = folder(name)
        for target, _, _ in found:
            if not target.startswith("iopo"):
                continue
            there = folder(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{name} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = {n: {t for t, _, _ in found if t in GRAPH and t != n} for n, found in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_commands_never_import_commands():
    wrong = [
        f"{name} imports {target}"
        for name, found in GRAPH.items()
        if folder(name) == "commands"
        for target, _, _ in found
        if folder(target) == "commands" and target not in ("iopo.commands", name)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_taken_from_another_module():
    """Neither the package nor its tests import a `_name` from another module: what is shared is public."""
    everything = {**{n: p for n, p in modules().items()}}
    known = set(everything)
    sources = list(everything.items()) + [(f"tests.{p.stem}", p) for p in sorted(TESTS.glob("*.py"))]
    wrong = []
    for name, path in sources:
        for target, names, _ in imports(path, known):
            wrong += [f"{name} takes {target}.{n}" for n in names if n.startswith("_") and target != name]
    assert not wrong, "\n".join(wrong)


def _loaded_with(name: str) -> set[str]:
    """Every module a module's import loads: its module-level imports, followed through iopo's own modules."""
    seen, todo, heavy = set(), [name], set()
    while todo:
        current = todo.pop()
        if current in seen or current not in GRAPH:
            continue
        seen.add(current)
        for target, _, at_load in GRAPH[current]:
            if not at_load:
                continue
            if target.split(".")[0] in HEAVY:
                heavy.add(f"{target} (from {current})")
            todo.append(target)
            todo += [parent for parent in _parents(target)]
    return heavy


def _parents(name: str) -> list[str]:
    """Importing iopo.a.b runs iopo/__init__ and iopo/a/__init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@pytest.mark.parametrize(
    "name",
    ["iopo.commands.rate", "iopo.commands.plot", "iopo.commands.report", "iopo.cli", "iopo.config", "iopo"],
)
def test_light_modules_never_load_torch(name):
    assert not _loaded_with(name), _loaded_with(name)


def test_no_file_past_the_size_of_a_room():
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, big


def test_rate_plot_and_report_commands_run_without_torch(tmp_path):
    """The commands themselves, in a fresh interpreter: `iopo rate` (serve=false) on a small eval folder, `iopo plot`
    and `iopo report` on it; torch, transformers and accelerate stay unloaded."""
    from iopo.io import runfolder

    ev = tmp_path / "ev"
    (ev / "generations").mkdir(parents=True)
    runfolder.mark(ev)  # as `iopo eval` marks its folder
    record = {"prompt_id": "p1", "sample": 0, "prompt": "hi?", "answer": "", "finish_reason": "stop"}
    for label, answer in (("m", "hello"), ("base", "hey")):
        row = {**record, "key": label, "answer": answer, "model": label}
        (ev / "generations" / f"{label}.jsonl").write_text(json.dumps(row) + "\n")
    results = {"baseline": "base", "models": {"m": "m"}, "judges": {}, "metrics": {}, "n_pairs": 0}
    (ev / "eval.json").write_text(json.dumps(results))
    code = (
        "import sys\nfrom iopo.cli import main\n"
        f"assert main(['rate', {str(ev)!r}, 'serve=false', 'bootstrap=10']) == 0\n"
        f"assert main(['plot', {str(ev)!r}, 'output_dir={tmp_path / 'plots'}']) == 0\n"
        f"assert main(['report', {str(ev)!r}, 'output={tmp_path / 'report.md'}']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (ev / "human" / "ratings.csv").is_file() and (tmp_path / "report.md").is_file()
