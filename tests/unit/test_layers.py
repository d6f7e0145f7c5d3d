"""Dependencies point inward: what each layer of the package may import
(README, Layout). Read from the source, so a new import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ledger_service"

# Layer -> the layers of this package it may import from.
ALLOWED = {
    "domain": {"domain"},
    "auth": {"domain", "auth"},
    "service": {"domain", "service"},
    "streaming": {"domain", "service", "streaming"},
    "api": {"domain", "auth", "service", "streaming", "api"},
    "storage": {"domain", "service", "streaming", "api", "storage"},
    "integrity": {"domain", "storage", "integrity"},
}


def imported_layers(path: Path) -> set[str]:
    """The first component under ledger_service of every import in `path`."""
    layers = set()
    package = path.relative_to(ROOT).parent.parts  # e.g. ("ledger_service", "api")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [[*parts, a.name] for a in node.names]
            else:
                names = [(node.module or "").split(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if parts[0] == "ledger_service" and len(parts) > 1:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_from_the_layers_inside_it(layer: str) -> None:
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        outside = imported_layers(path) - ALLOWED[layer]
        assert not outside, f"{path.relative_to(ROOT)} imports from {sorted(outside)}"


def test_the_bench_does_not_import_the_tests() -> None:
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(m.split(".")[0] == "tests" for m in modules), path
