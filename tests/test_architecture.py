"""The package layout keeps its promises: dependency rules, public faces, small modules.

Checked statically on the source (every import, also those inside functions) and, for
the import-cost promises, by importing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spillover"
PACKAGES = ("data", "evaluate", "align", "stats", "report", "runs", "cli")
SHARED = ("errors", "_io", "_checks", "rundir", "prompts", "models")
HEAVY = ("torch", "transformers", "trl", "peft")


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _owner(path: Path) -> str:
    """The top-level unit a file belongs to: a stage package or a shared module."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, tree: ast.Module) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """``(line, absolute module, imported names)`` of every import in a file."""
    package = ["spillover", *path.relative_to(SRC).parent.parts]
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
            if rule == "heavy" and owner in ("stats", "report") and top in HEAVY:
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
    ["heavy", "trl", "peft-training", "evaluate-align", "data-alone", "faces", "private-names"],
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
