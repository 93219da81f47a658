"""The command line: train with progress, query, and clear errors (run as real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import demo
from service.core.config import ROOT
from tests.helpers import cli, seed_cache

# Every test runs the CLI as a subprocess: TensorFlow loads in each.
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, models_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "STORAGE_URI": str(tmp_path / "store"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "MODELS_DIR": str(models_dir),
    }


def test_train_then_query(env: dict[str, str], photos_zip: Path, tmp_path: Path) -> None:
    trained = cli("train", "food", str(photos_zip), env=env)
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["counts"]["images"] == 30
    assert "embed" in trained.stderr  # the progress bar

    image = tmp_path / "query.jpg"
    image.write_bytes(demo.jpeg(demo.photo("chelsea")))
    found = cli("query", "food", str(image), "-k", "2", env=env)
    assert found.returncode == 0, found.stderr
    body = json.loads(found.stdout)
    assert body["version"] == result["version"]
    assert body["results"][0]["name"] == "chelsea/chelsea-original.jpg"
    assert body["results"][0]["image_url"].startswith("file://")

    # The photos come in variants (resized, recompressed...): duplicates of each other (issue 22).
    twins = cli("duplicates", "food", env=env)
    assert twins.returncode == 0, twins.stderr
    report = json.loads(twins.stdout)
    assert report["version"] == result["version"] and report["groups"]
    for group in report["groups"]:
        photos = {item["name"].split("/")[0] for item in group["items"]}
        assert len(photos) == 1, group  # never two different photos in one group
        assert group["items"][0]["score"] == 1.0
    table = tmp_path / "twins.csv"
    assert cli("duplicates", "food", "--csv", str(table), env=env).returncode == 0
    assert table.read_text().splitlines()[0] == "group,keeper,exact,id,name,label,score,metadata,image_url"
    refused = cli("duplicates", "food", "--threshold", "1.5", env=env)
    assert refused.returncode == 2 and "threshold" in refused.stderr


def test_errors_are_one_line_not_a_traceback(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "query.jpg"
    image.write_bytes(demo.jpeg(demo.photo("chelsea")))
    untrained = cli("query", "fashion", str(image), env=env)
    assert untrained.returncode == 2
    assert "no trained version" in untrained.stderr and "Traceback" not in untrained.stderr

    bad = tmp_path / "endpoints"
    bad.mkdir()
    (bad / "oops.toml").write_text("[encoder]\nsource = 3\n")
    listed = cli("endpoints", env={**env, "ENDPOINTS_DIR": str(bad)})
    assert listed.returncode == 2
    assert "oops.toml: encoder.source" in listed.stderr


def test_demo_trains_every_untrained_endpoint_once(env: dict[str, str]) -> None:
    first = run_demo(env)
    assert first.returncode == 0, first.stderr
    assert "fashion: trained" in first.stdout and "food: trained" in first.stdout
    if demo.fashion_available():
        assert "fashion-mnist-5.zip" in first.stdout
    again = run_demo(env)
    assert "fashion: already serving" in again.stdout and "food: already serving" in again.stdout


def test_bad_token_settings_stop_cli_commands_too(env: dict[str, str]) -> None:
    bad = cli("versions", "list", "food", env={**env, "ENDPOINT_TOKENS": json.dumps({"nope": "x" * 20})})
    assert bad.returncode == 2 and "ENDPOINT_TOKENS names unknown endpoints: nope" in bad.stderr


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`make demo`'s command: bench/demo.py (development tools, not the service's CLI), with a
    smaller Fashion-MNIST set than the demo's 500 images. Without fusing the heads: a fused
    head costs the run a conversion of the encoder (14 of its 36 s here), and what the demo
    adds is which endpoints it trains, not how (tests/training/test_fuse.py fuses heads)."""
    command = [sys.executable, "-m", "bench.demo", "--fashion-per-class", "5"]
    seed_cache(Path(env["CACHE_DIR"]))
    env = {**env, "FUSE_HEAD": "0"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
