"""Endpoint files: the shipped ones are valid; a bad one fails naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import create_app
from service.core.config import ROOT
from service.core.endpoint import QueryConfig, load_endpoints, parse_endpoint
from service.core.errors import EndpointConfigError

GOOD = """
description = "test"
[encoder]
source = "https://tfhub.dev/google/bit/m-r50x1/1"
input_size = 224
[index]
n_trees = 8
search_k = 500
[query]
default_k = 5
max_k = 20
"""

SHIPPED = sorted((ROOT / "endpoints").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_endpoint_file_is_valid(path: Path) -> None:
    spec = parse_endpoint(path)
    assert spec.name == path.stem
    assert spec.encoder.is_remote, "shipped endpoints name real TF-Hub handles for production"
    assert spec.metric == "angular"
    assert 1 <= spec.default_k <= spec.max_k


def test_shipped_endpoints_include_fashion_and_food() -> None:
    assert {"fashion", "food"} <= set(load_endpoints(ROOT / "endpoints"))


def test_a_valid_file_is_read_into_a_frozen_spec(tmp_path: Path) -> None:
    path = tmp_path / "bit-test.toml"
    path.write_text(GOOD)
    spec = parse_endpoint(path)
    assert (spec.name, spec.encoder.input_size, spec.n_trees, spec.search_k) == ("bit-test", 224, 8, 500)
    assert (spec.default_k, spec.max_k, spec.head.feature_dim) == (5, 20, 256)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert spec.query == QueryConfig()  # the bench's choice unless the file says otherwise
    (tmp_path / "plain.toml").write_text(GOOD + "mirror = false\nexpansion = 0\nalpha = 1.5\n")
    assert parse_endpoint(tmp_path / "plain.toml").query == QueryConfig(False, 0, 1.5)


def test_a_relative_saved_model_path_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "local.toml"
    path.write_text('[encoder]\nsource = "models/mine"\ninput_size = 96\n')
    assert parse_endpoint(path).encoder.source == str(tmp_path / "models" / "mine")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[encoder]\ninput_size = 224\n", "encoder.source"),
        ('[encoder]\nsource = "x"\n', "encoder.input_size"),
        ('[encoder]\nsource = "x"\ninput_size = "big"\n', "encoder.input_size"),
        ('[encoder]\nsource = "x"\ninput_size = 0\n', "encoder.input_size"),
        ('[encoder]\nsource = "x"\ninput_size = true\n', "encoder.input_size"),
        ('name = "Bad Name"\n[encoder]\nsource = "x"\ninput_size = 9\n', "name"),
        ('name = "health"\n[encoder]\nsource = "x"\ninput_size = 9\n', "name"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[index]\nmetric = "euclidean"\n', "index.metric"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[index]\nsearch_k = -2\n', "index.search_k"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\ndefault_k = 50\nmax_k = 10\n', "query.default_k"),
        ('[encoder]\nsource = "x"\ninput_size = 9\nn_tres = 3\n', "n_tres"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[index]\nntrees = 3\n', "index.ntrees"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\nmirror = 1\n', "query.mirror"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\nexpansion = -1\n', "query.expansion"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\nexpansion = 10000000000\n', "query.expansion"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\nalpha = 0\n', "query.alpha"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[query]\nalpha = "x"\n', "query.alpha"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[duplicates]\nthreshold = 0\n', "duplicates.threshold"),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[head]\nloss = "triplet"\n', "head.loss: must be one of"),
        (
            '[encoder]\nsource = "x"\ninput_size = 9\n[head]\nstop_on = "accuracy"\n',
            "head.stop_on: must be one of",
        ),
        (
            '[encoder]\nsource = "x"\ninput_size = 9\n[head]\nlearning_rate = 0\n',
            "head.learning_rate: must be",
        ),
        (
            '[encoder]\nsource = "x"\ninput_size = 9\n[head]\nlearning_rate = nan\n',
            "head.learning_rate: must",
        ),
        ('[encoder]\nsource = "x"\ninput_size = 9\n[head]\npatience = 0\n', "head.patience: must be >= 1"),
        ("[encoder\n", "not a readable TOML file"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(EndpointConfigError) as info:
        parse_endpoint(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_the_head_table_sets_the_loss_and_its_schedule(tmp_path: Path) -> None:
    path = tmp_path / "arc.toml"
    path.write_text(GOOD + '[head]\nloss = "arcface"\nmargin = 0.3\nlearning_rate = 0.001\npatience = 4\n')
    head = parse_endpoint(path).head
    assert (head.loss, head.margin, head.learning_rate, head.patience) == ("arcface", 0.3, 0.001, 4)
    path.write_text(GOOD)
    head = parse_endpoint(path).head  # the defaults bench/quality.py chose (docs/BENCHMARKS.md)
    assert (head.loss, head.margin, head.scale, head.learning_rate, head.patience) == (
        "cosface",
        0.35,
        30.0,
        3e-4,
        5,
    )
    assert head.stop_on == "retrieval"
    path.write_text(GOOD + '[head]\nstop_on = "loss"\n')
    assert parse_endpoint(path).head.stop_on == "loss"


def test_two_files_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "same"\n' + GOOD)
    (tmp_path / "b.toml").write_text('name = "same"\n' + GOOD)
    with pytest.raises(EndpointConfigError, match="already defined"):
        load_endpoints(tmp_path)


def test_adding_an_endpoint_is_adding_one_file(tmp_path: Path) -> None:
    (tmp_path / "art.toml").write_text(GOOD)
    app = create_app(
        {
            "endpoints_dir": tmp_path,
            "storage_uri": str(tmp_path / "s"),
            "warm_on_start": False,
            "cache_dir": tmp_path / "c",
        }
    )
    names = [e["name"] for e in app.test_client().get("/endpoints").get_json()["endpoints"]]
    assert names == ["art"]
    app.extensions["simsvc"].close()


def test_the_app_does_not_start_with_a_bad_endpoint_file(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text(GOOD)
    (tmp_path / "bad.toml").write_text('[encoder]\nsource = "x"\ninput_size = -3\n')
    with pytest.raises(EndpointConfigError, match=r"bad\.toml: encoder\.input_size"):
        create_app({"endpoints_dir": tmp_path, "storage_uri": str(tmp_path / "s"), "warm_on_start": False})
