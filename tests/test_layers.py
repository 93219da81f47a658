"""The package map: every part of service/ sits in a layer, imports only downward, and nothing cycles."""

from __future__ import annotations

import logging
import tomllib

import grimp
from importlinter.cli import lint_imports

from service.core.config import ROOT

CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_import_contracts_hold() -> None:
    # lint_imports configures logging with dictConfig, which disables every logger that exists by
    # then (the service's own, for the tests that run after this one): put them back as they were.
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = {logger: logger.disabled for logger in loggers}
    try:
        # Layers import only downward; only service.api imports Flask, Werkzeug or marshmallow.
        assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0
    finally:
        for logger, was in disabled.items():
            logger.disabled = was


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
