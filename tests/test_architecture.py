"""The package map is the architecture: each package imports only packages below it.

Checked on the source, function-level imports included, so a shortcut taken inside a function
still fails here (imports under ``if TYPE_CHECKING:`` are annotations only and load nothing);
and, for ``ldmkit.vitals`` (which other people's loops import), on what a
fresh interpreter actually loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ldmkit

SRC = Path(ldmkit.__file__).parent
# low to high; a package may import its own rank and the ranks before it
LAYERS = [
    {"errors", "platform"},
    {"diffusion"},
    {"config"},
    {"models"},
    {"vitals"},
    {"run"},
    {"data"},
    {"conditioning"},
    {"sampling"},
    {"training"},
    {"report", "integrations"},
    {"jobs", "probe", "cli", "__init__", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# what ldmkit.vitals may load: the diffusion math for loss units, the platform's safe files
VITALS_MAY_LOAD = ("ldmkit", "ldmkit.errors", "ldmkit.platform", "ldmkit.platform.files",
                   "ldmkit.platform.lock",
                   "ldmkit.diffusion", "ldmkit.diffusion.parameterization", "ldmkit.diffusion.registry",
                   "ldmkit.diffusion.condition", "ldmkit.diffusion.schedule")


def _package(module: str) -> str:
    """``ldmkit.training.loop`` -> ``training``; a top-level module is its own package."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(module: str, source: str) -> list[str]:
    """The ldmkit modules that ``source`` (the text of ``module``) imports, anywhere in it."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.rsplit(".", node.level)[0]
            found.append(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldmkit"):
            found += [f"{node.module}.{a.name}" if node.module == "ldmkit" else node.module
                      for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ldmkit")]
    return [m for m in found if m.startswith("ldmkit.")]


def test_every_module_belongs_to_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py")}
    assert packages | modules <= set(RANK), sorted((packages | modules) - set(RANK))
    assert len(modules - {"__init__", "__main__"}) <= 3, "flat modules belong in a package"


def test_no_package_imports_a_higher_one():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        here = "__init__" if path.parent == SRC and path.stem == "__init__" else (
            path.stem if path.parent == SRC else path.relative_to(SRC).parts[0])
        module = "ldmkit." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        for target in _imports(module, path.read_text()):
            there = _package(target)
            if there in RANK and RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(SRC)} imports {target}")
    assert upward == []


def test_the_checker_sees_upward_imports_anywhere():
    """The layer test can fail: imports inside functions and relative ones are found."""
    source = ("def f():\n    from ldmkit.training.loop import train\n"
              "from ..run import layout\nfrom . import metrics\nimport ldmkit.report.html\n"
              "if TYPE_CHECKING:\n    from ldmkit.sampling.trained import Trained\n")
    found = _imports("ldmkit.vitals.logs.readers", source)
    assert sorted(found) == ["ldmkit.report.html", "ldmkit.training.loop", "ldmkit.vitals.logs",
                             "ldmkit.vitals.run"]
    assert RANK[_package("ldmkit.training.loop")] > RANK["vitals"]


def test_the_vitals_package_loads_only_what_it_may():
    """Other people's loops import ldmkit.vitals: it must not pull ldmkit's config, optimizer,
    training loop or run storage (found by what a fresh interpreter loads, not by names)."""
    code = ("import pkgutil, importlib, sys, ldmkit.vitals as v\n"
            "for m in pkgutil.walk_packages(v.__path__, 'ldmkit.vitals.'): "
            "importlib.import_module(m.name)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('ldmkit'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = out.stdout.split()
    assert any(m.startswith("ldmkit.vitals.logs.") for m in loaded)
    extra = [m for m in loaded if not m.startswith("ldmkit.vitals") and m not in VITALS_MAY_LOAD]
    assert extra == []


def test_the_cli_starts_without_torch():
    """``ldmkit --help`` and argument errors answer at once: the CLI and the config (with the
    objectives' and samplers' names it validates against) do not import torch."""
    code = "import sys, ldmkit.cli, ldmkit.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
