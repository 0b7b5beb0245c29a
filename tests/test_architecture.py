"""The package layout keeps its promises: dependency rules, public faces, small modules.

Checked statically on the source (every import, also those inside functions) and, for
the import-cost promises, by importing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spillover"
PACKAGES = ("data", "predictions", "evaluate", "align", "stats", "report", "runs", "cli")
STAGES = PACKAGES[:-1]
SHARED = ("errors", "_io", "_checks", "rundir", "prompts", "models")
HEAVY = ("torch", "transformers", "trl", "peft")


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _owner(path: Path) -> str:
    """The top-level unit a file belongs to: a stage package or a shared module."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(
    path: Path, tree: ast.Module, root: Path | None = None
) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """``(line, absolute module, imported names)`` of every import in a file of the tree at
    ``root`` (default :data:`SRC`)."""
    package = ["spillover", *path.relative_to(root or SRC).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module, tuple(a.name for a in node.names)


def _violations(rule: str) -> list[str]:
    out = []
    for path, tree in _modules():
        owner = _owner(path)
        for line, module, names in _imports(path, tree):
            where = f"{path.relative_to(SRC.parent)}:{line}"
            top = module.split(".")[0]
            parts = module.split(".")
            target = parts[1] if top == "spillover" and len(parts) > 1 else None
            if rule == "heavy" and owner in ("stats", "report", "predictions") and top in HEAVY:
                out.append(f"{where}: {owner} imports {module}")
            if rule == "trl" and top == "trl" and owner != "align":
                out.append(f"{where}: {owner} imports {module}")
            if rule == "peft-training" and top == "peft" and owner != "align":
                training = {"LoraConfig", "get_peft_model", "prepare_model_for_kbit_training"}
                if training & set(names):
                    out.append(f"{where}: {owner} imports {names} from peft")
            if rule == "evaluate-align" and owner == "evaluate" and target == "align":
                out.append(f"{where}: evaluate imports {module}")
            if rule == "data-alone" and owner == "data" and target not in (
                None, "data", "errors", "_io", "_checks",
            ):  # fmt: skip
                out.append(f"{where}: data imports {module}")
            if rule == "predictions-alone" and owner == "predictions" and target not in (
                None, "predictions", "data", "errors", "_io", "_checks", "_lazy",
            ):  # fmt: skip
                out.append(f"{where}: predictions imports {module}")
            if rule == "faces" and target in PACKAGES and target != owner:
                if len(parts) > 2:
                    out.append(f"{where}: {owner} imports the private module {module}")
                private = [n for n in names if n.startswith("_")]
                if private:
                    out.append(f"{where}: {owner} imports private {private} from {module}")
            if rule == "private-names" and top == "spillover" and target != owner:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    out.append(f"{where}: {owner} imports private {private} from {module}")
    return out


@pytest.mark.parametrize(
    "rule",
    [
        "heavy",
        "trl",
        "peft-training",
        "evaluate-align",
        "data-alone",
        "predictions-alone",
        "faces",
        "private-names",
    ],
)
def test_dependency_rule(rule: str) -> None:
    assert _violations(rule) == []


def test_the_rules_see_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a planted bad import in a copy of the tree is reported."""
    import shutil

    copy = tmp_path / "spillover"
    shutil.copytree(SRC, copy)
    bad = copy / "stats" / "planted.py"
    bad.write_text("import torch\nfrom ..evaluate.files import write_table\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    assert any("planted.py:1" in v for v in _violations("heavy"))
    assert any("planted.py:2" in v for v in _violations("faces"))


def test_modules_and_functions_stay_small() -> None:
    big: list[str] = []
    for path, tree in _modules():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > 700:
            big.append(f"{path.relative_to(SRC.parent)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    length -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
                if length > 80:
                    big.append(f"{path.relative_to(SRC.parent)}: {node.name}() {length} lines")
    assert big == []


def test_every_stage_package_has_a_face() -> None:
    import importlib

    for name in PACKAGES:
        module = importlib.import_module(f"spillover.{name}")
        exported = getattr(module, "__all__", None)
        assert exported, f"spillover.{name} has no __all__"
        for attr in exported:
            assert getattr(module, attr) is not None, f"spillover.{name}.{attr}"


def test_light_imports_stay_light() -> None:
    code = (
        "import sys\n"
        "import spillover, spillover.stats, spillover.report, spillover.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'pandas', 'matplotlib')"
        " if m in sys.modules]\n"
        "import spillover.stats as s, spillover.report as r\n"
        "s.compare_runs, r.write_report\n"
        "model = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy) + '|' + ','.join(model))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "|"


# --------------------------------------------------------------------------- import graph


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the spillover modules it imports (at any depth of its code, outside
    ``TYPE_CHECKING``); ``from package import name`` counts the package and, when ``name``
    is one of its modules, that module too."""
    modules = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for line, module, names in _imports(path, tree, root):
            if line in skip or not module.startswith("spillover"):
                continue
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert import_cycles(import_graph()) == []


def test_the_cycle_check_sees_a_circle(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "spillover"
    shutil.copytree(SRC, copy)
    (copy / "align" / "planted.py").write_text(
        "def f():\n    from .config import AlignConfig\n", encoding="utf-8"
    )
    config = copy / "align" / "config.py"
    config.write_text(config.read_text(encoding="utf-8") + "\nfrom . import planted\n")
    cycles = import_cycles(import_graph(copy))
    assert any({"spillover.align.config", "spillover.align.planted"} <= set(g) for g in cycles)


# --------------------------------------------------------------------------- faces


def _face_names(package: str) -> tuple[set[str], set[str], set[str], list[str]]:
    """A face's eager imports, the names its lazy table loads, its TYPE_CHECKING imports,
    and its ``__all__``."""
    path = SRC / package / "__init__.py" if package else SRC / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    eager: set[str] = set()
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = {a.asname or a.name for a in node.names}
            (typed if node.lineno in skip else eager).update(names)
    module = importlib.import_module("spillover" + (f".{package}" if package else ""))
    lazy_map = getattr(module, "_LAZY", None) or {}
    lazy = {n for names in lazy_map.values() for n in names}
    return eager, lazy, typed, list(module.__all__)


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "cli"])
def test_faces_list_each_name_consistently(package: str) -> None:
    """``__all__`` is exactly the face's eager imports plus its lazily loaded names, and the
    ``TYPE_CHECKING`` block imports exactly the lazy ones (so no list can drift)."""
    eager, lazy, typed, exported = _face_names(package)
    eager.discard("lazy_getattr")
    eager.discard("annotations")
    assert typed == lazy
    assert sorted(exported) == sorted(eager | lazy)
    assert len(exported) == len(set(exported))


def test_faces_export_entry_points_configs_and_records_only() -> None:
    """75 names for BBQ's stages (231 before the faces were cut to what other packages use),
    19 more for the likelihood-probe benchmarks (their items, loaders, selection, record
    kinds, the join, the evaluation, the metrics and the paired comparison), and 1 for
    the executors of a sweep (ExecutorConfig)."""
    total = sum(len(importlib.import_module(f"spillover.{p}").__all__) for p in PACKAGES)
    assert total <= 95


def test_architecture_doc_lists_every_module() -> None:
    """docs/architecture.md's layout block names exactly the modules of each package."""
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = doc.split("```", 2)[1]
    texts: dict[str, str] = {}
    current = None
    for line in block.splitlines()[1:]:
        head, rest = line[:23].strip(), line[23:]
        if head:
            current = head[:-1] if head.endswith("/") else None
            if current is not None:
                texts[current] = ""
        if current is not None:
            texts[current] += " " + rest
    listed: dict[str, set[str]] = {}
    for package, text in texts.items():
        depth, entry, words = 0, "", set()
        for ch in text + ",":
            depth += (ch == "(") - (ch == ")")
            if ch in ",;" and depth == 0:
                word = entry.strip().split(" ")[0]
                if word and not word.endswith("/"):  # a folder (templates/) is no module
                    words.add(word)
                entry = ""
            else:
                entry += ch
        listed[package] = words
    for package in PACKAGES:
        actual = {p.stem for p in (SRC / package).glob("*.py") if p.stem != "__init__"}
        assert listed.get(package) == actual, package
    shared = {line[:23].strip() for line in block.splitlines()} - {""}
    assert {p.name for p in SRC.glob("*.py") if p.name != "__main__.py"} <= shared


# --------------------------------------------------------------------------- commands

MAX_STAGE_CALLS = 3
"""Stage functions one command may call: the CLI parses, calls its stage and prints."""


def _stage_functions(tree: ast.Module, path: Path) -> set[str]:
    """Names a CLI module imports from stage faces that are functions (lowercase)."""
    out: set[str] = set()
    for _, module, names in _imports(path, tree):
        parts = module.split(".")
        if len(parts) == 2 and parts[0] == "spillover" and parts[1] in STAGES:
            out.update(n for n in names if n[:1].islower())
    return out


def command_stage_calls(path: Path) -> dict[str, set[str]]:
    """Per ``*_command`` function of a CLI module: the stage functions it calls, itself or
    through the module's own helper functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    stage = _stage_functions(tree, path)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def calls(node: ast.AST) -> set[str]:
        return {
            c.func.id
            for c in ast.walk(node)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
        }

    out: dict[str, set[str]] = {}
    for name, node in funcs.items():
        if not name.endswith("_command"):
            continue
        seen: set[str] = set()
        todo = [node]
        used: set[str] = set()
        while todo:
            current = todo.pop()
            for called in calls(current):
                if called in stage:
                    used.add(called)
                elif called in funcs and called not in seen and not called.endswith("_command"):
                    # a command handing over to another command is counted there
                    seen.add(called)
                    todo.append(funcs[called])
        out[name] = used
    return out


def test_commands_call_few_stage_functions() -> None:
    heavy = {
        f"{path.name}:{name}": sorted(used)
        for path in sorted((SRC / "cli").glob("*.py"))
        for name, used in command_stage_calls(path).items()
        if len(used) > MAX_STAGE_CALLS
    }
    assert heavy == {}


def test_the_command_check_sees_a_command_that_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    copy = tmp_path / "spillover"
    shutil.copytree(SRC, copy)
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    planted = copy / "cli" / "planted.py"
    planted.write_text(
        "from ..stats import compare_runs, compute_metrics\n"
        "from ..predictions import read_predictions, join_with_bbq\n"
        "def _helper(p):\n    return join_with_bbq(read_predictions(p), None)\n"
        "def planted_command(p):\n    compute_metrics(_helper(p))\n    compare_runs(p, p)\n",
        encoding="utf-8",
    )
    used = command_stage_calls(planted)
    assert used["planted_command"] == {
        "compare_runs", "compute_metrics", "join_with_bbq", "read_predictions",
    }  # fmt: skip
