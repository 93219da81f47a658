"""The package map: every part of service/ sits in a layer, imports only downward, and nothing cycles."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

from service.core.config import ROOT

CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_import_contracts_hold() -> None:
    # Layers import only downward; only service.api imports Flask, Werkzeug or marshmallow.
    # In a subprocess, as `make lint` runs it: import-linter's CLI reconfigures logging with
    # dictConfig, which would disable every logger already made in this test process.
    linter = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_part_of_the_package_is_in_a_layer() -> None:
    layers = next(c for c in CONFIG["contracts"] if c["type"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    parts = {f"service.{p.stem}" for p in (ROOT / "service").iterdir() if p.suffix == ".py" or p.is_dir()}
    parts -= {"service.__init__", "service.__pycache__"}
    assert parts == named, "a new module or sub-package of service/ needs a place in the layers"


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("service")
    cycles = [
        (a, b)
        for a in sorted(graph.modules)
        for b in graph.find_modules_directly_imported_by(a)
        if b != "service" and graph.chain_exists(importer=b, imported=a)
    ]
    assert cycles == []
