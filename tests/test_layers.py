"""Imports run one way: each module of the farebox package imports only its own layer or those
below it (foundation <- schemas <- routing and providers <- stages <- client, CLI, supervisor,
emulator). Parsed from the source, lazy imports inside functions included."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "farebox"

# Layer of each top-level module or subpackage of farebox; a higher number may import a lower one.
LAYERS: dict[str, int] = {
    # foundation: names, errors, settings, metrics, tokens, logs and the fenced library patches
    "constants": 0,
    "errors": 0,
    "settings": 0,
    "metrics": 0,
    "tokens": 0,
    "logs": 0,
    "patches": 0,
    "publishing": 0,
    "amqp_connect": 0,  # connections to the broker's node or nodes, failing over (farebox/patches/aio_pika_failover.py)
    "health": 0,  # the liveness and readiness the metrics server answers /livez and /readyz from
    "redis_connect": 0,  # which Redis client a URL names (server, Sentinel, Cluster)
    "catalog": 0,  # data only
    "schemas": 1,
    "routing": 2,
    "providers": 2,
    "stages": 3,
    "client": 4,
    "intake": 4,  # the client's probing of the intake and its lanes
    "submit": 4,
    "report": 4,
    "feedback_export": 4,
    "strategy_report": 4,
    "key_upgrade": 4,  # moves a single server's keys of before the Redis Cluster layout to today's names
    "supervisor": 4,
    "emulator": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 0,
}
# Within the foundation, these may not import farebox at all (everything else leans on them).
LEAVES = {"constants", "errors"}
# Names other projects use: nothing may import them as if they were farebox's (the package is one).
FOREIGN_TOP_LEVEL = {"workers", "schemas", "catalog", "tests", "bench"}


def package_files() -> list[Path]:
    """Every .py file of the package, through the links that bring schemas/ and workers/ in."""
    return sorted(Path(d, f) for d, _, files in os.walk(PACKAGE, followlinks=True) for f in files if f.endswith(".py"))


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file (or in ``text`` as if it were that
    file), relative ones resolved."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] if base == "farebox" else [base]
            found += [(node.lineno, n) for n in names]
    return found


def farebox_modules() -> list[Path]:
    return [p for p in package_files() if "catalog" not in p.relative_to(PACKAGE).parts[:1]]


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {unit_of(p) for p in package_files()} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    units.discard("__pycache__")
    assert units - set(LAYERS) == set(), "give each new module or subpackage a layer here"


@pytest.mark.parametrize("path", farebox_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    unit = unit_of(path)
    wrong = []
    for line, name in imported_modules(path):
        top, _, rest = name.partition(".")
        if top in FOREIGN_TOP_LEVEL:
            wrong.append(f"line {line}: imports {name}, which is not part of the farebox package")
        if top != "farebox" or not rest:
            continue
        target = rest.split(".")[0]
        if target == unit:
            continue
        if unit in LEAVES:
            wrong.append(f"line {line}: {unit} is a leaf of the foundation and imports {name}")
        elif LAYERS[target] > LAYERS[unit]:
            wrong.append(f"line {line}: {unit} (layer {LAYERS[unit]}) imports {name} (layer {LAYERS[target]})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "where", "expected"),
    [
        ("from farebox.stages import runtime", "cli/jobs.py", ["farebox.stages"]),
        ("from . import knobs", "emulator/app.py", ["farebox.emulator"]),
        ("from .. import errors", "stages/route.py", ["farebox.errors"]),
        ("from farebox import metrics, errors", "x.py", ["farebox.metrics", "farebox.errors"]),
        ("def f():\n    import farebox.client", "y.py", ["farebox.client"]),
    ],
)
def test_the_import_parser_sees_every_form(source: str, where: str, expected: list[str]) -> None:
    """The checker must see relative, multi-name and lazy imports, or the layering test proves nothing."""
    assert [n for _, n in imported_modules(PACKAGE / where, source)] == expected


def outside_files() -> list[Path]:
    root = PACKAGE.parent
    # Hidden folders (the benchmarks' own virtual environments for their peers) are not the project's code.
    return sorted(
        p
        for d in ("tests", "bench", "examples")
        for p in (root / d).rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


@pytest.mark.parametrize("path", outside_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_tests_and_benchmarks_import_the_package_not_its_folders(path: Path) -> None:
    """From a checkout, ``import schemas`` would find the folder; installed, only farebox exists."""
    wrong = [
        f"line {line}: {name}"
        for line, name in imported_modules(path)
        if name.partition(".")[0] in FOREIGN_TOP_LEVEL - {"tests", "bench"}
    ]
    assert not wrong, "\n".join(wrong)
