"""Filtered search: parsing `label=`/`where=`, masks over a version's rows, masked index search
(exact and over-fetching Annoy, groups), and the filters through the HTTP API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from flask.testing import FlaskClient

from bench import demo
from service import create_app
from service.catalog import index
from service.catalog.index import IndexReader, build_index
from service.core.errors import InvalidParameterError
from service.serving.filters import AnyOf, ColumnCache, Filter, Range, evaluate, parse_filter
from tests.helpers import TEST_PHOTOS, make_zip, settings_for, train, wait_serving

# --- parsing ------------------------------------------------------------------------------------


def test_no_filter_is_none() -> None:
    assert parse_filter(None, None) is None
    assert parse_filter([], "{}") is None


def test_a_filter_parses_labels_equality_any_of_and_ranges() -> None:
    flt = parse_filter(["shoes", "boots"], '{"colour": ["red", 1.0], "size": 42, "price": {"max": 50}}')
    assert flt == Filter(
        (
            AnyOf(("label",), frozenset({"shoes", "boots"})),
            AnyOf(("metadata", "colour"), frozenset({"red", ("n", 1)})),
            AnyOf(("metadata", "size"), frozenset({("n", 42)})),
            Range(("metadata", "price"), None, 50.0),
        )
    )
    assert parse_filter(None, {"price": {"min": 1, "max": 1}}) == Filter(
        (Range(("metadata", "price"), 1, 1),)
    )


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"price": NaN}', "not valid JSON"),
        ('["red"]', "must be a JSON object"),
        ('"red"', "must be a JSON object"),
        ('{"colour": []}', "empty list matches nothing"),
        ('{"colour": [["red"]]}', "list values must be strings, numbers, booleans or null"),
        ('{"colour": [{"min": 1}]}', "list values must be strings, numbers, booleans or null"),
        ('{"price": {"min": "cheap"}}', "min must be a number"),
        ('{"price": {"max": true}}', "max must be a number"),
        ('{"price": {"min": 50, "max": 10}}', "min 50 is greater than max 10"),
        ('{"price": {"below": 10}}', "unknown range key(s) ['below']"),
        ('{"price": {}}', "a range needs 'min' and/or 'max'"),
        ('{"": 1}', "a field name must have 1 to 200 characters"),
        (json.dumps({f"f{i}": 1 for i in range(51)}), "at most 50 fields, got 51"),
        (json.dumps({"colour": list(range(101))}), "at most 100 values, got 101"),
        (json.dumps({"colour": "x" * 5000}), "at most 4096 characters"),
        ("[" * 3000, "nested too deeply"),
        ('{"price": {"min": 1%s}}' % ("0" * 400), "beyond the range of a double"),
    ],
)
def test_a_malformed_where_names_the_problem(where: str, problem: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_filter(None, where)
    assert caught.value.status == 422
    assert list(caught.value.errors) == ["where"] and problem in caught.value.errors["where"][0]
    assert problem in caught.value.message


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ([""], "a label has 1 to 200 characters"),
        (["x" * 201], "a label has 1 to 200 characters"),
        (["a/b"], "a label is one folder name"),
        (["ok\x00evil"], "no control, format or separator characters"),
        ([".hidden"], "does not start with '.'"),
        (["x"] * 101, "at most 100 labels"),
    ],
)
def test_a_malformed_label_names_the_problem(labels: list[str], problem: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_filter(labels, None)
    assert list(caught.value.errors) == ["label"] and problem in caught.value.errors["label"][0]


# --- masks --------------------------------------------------------------------------------------

ITEMS: list[dict[str, Any]] = [
    {"label": "shoes", "metadata": {"colour": "red", "price": 10, "size": 1}},
    {"label": "shoes", "metadata": {"colour": "blue", "price": 50.0, "size": 1.0}},
    {"label": "boots", "metadata": {"colour": "red", "price": "75", "size": "1"}},
    {"label": "boots", "metadata": {"colour": ["red"], "price": True, "size": True}},
    {"label": None, "metadata": {"colour": None, "price": "cheap"}},
    {"label": "hats", "metadata": {}},
]


def rows(labels: list[str] | None, where: Any) -> list[int]:
    flt = parse_filter(labels, where)
    assert flt is not None
    return np.flatnonzero(evaluate(flt, ITEMS, ColumnCache())).tolist()


@pytest.mark.parametrize(
    ("labels", "where", "expected"),
    [
        (["shoes"], None, [0, 1]),
        (["shoes", "boots"], None, [0, 1, 2, 3]),
        (["sandals"], None, []),
        (None, {"colour": "red"}, [0, 2]),  # a list value ["red"] is not "red"
        (None, {"colour": ["red", "blue"]}, [0, 1, 2]),
        (None, {"colour": None}, [4]),  # null matches null, not a missing field
        (None, {"size": 1}, [0, 1]),  # 1 == 1.0, but not "1" and not true
        (None, {"size": True}, [3]),
        (None, {"price": {"min": 10, "max": 50}}, [0, 1]),  # inclusive; true is not a number
        (None, {"price": {"min": 60}}, [2]),  # a string holding a number counts
        (None, {"price": {"max": 1e9}}, [0, 1, 2]),
        (["boots"], {"colour": "red", "price": {"max": 100}}, [2]),  # every condition holds
        (None, {"nowhere": "x"}, []),
    ],
)
def test_masks_keep_exactly_the_matching_rows(
    labels: list[str] | None, where: Any, expected: list[int]
) -> None:
    assert rows(labels, where) == expected


class CountingItems:
    """A sequence of items that counts how often an item is read."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items, self.reads = items, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.reads += 1
        return self.items[i]


def test_columns_are_built_once_per_field_and_cycling_fields_stops_reading() -> None:
    items, cache = CountingItems(ITEMS), ColumnCache()
    flt = parse_filter(["shoes"], {"colour": "red", "price": {"max": 50}})
    assert flt is not None
    first = evaluate(flt, items, cache)
    assert items.reads == len(ITEMS) and len(cache) == 3  # three columns, one pass
    first[:] = False  # the caller owns the mask it got
    assert evaluate(flt, items, cache).tolist() == [True, False, False, False, False, False]
    assert items.reads == len(ITEMS)  # nothing read again
    size = parse_filter(None, {"size": 1})
    assert size is not None and evaluate(size, items, cache).sum() == 2
    assert items.reads == 2 * len(ITEMS) and len(cache) == 4  # one pass for the new field
    for where in ({"nowhere": 1}, {"colour": ["blue"]}, {"size": 1.0}, {"price": {"min": 60}}):
        other = parse_filter(None, where)  # a field no row has costs nothing either
        assert other is not None
        evaluate(other, items, cache)
    assert items.reads == 2 * len(ITEMS) and len(cache) == 4


def test_long_distinct_values_count_against_the_budget_while_a_column_builds() -> None:
    rows = [{"label": "x", "metadata": {"note": f"{i:05d}" + "z" * 10_000}} for i in range(50)]
    cache = ColumnCache(max_bytes=100_000)  # ten such values
    note = parse_filter(None, {"note": "z"})
    assert note is not None
    with pytest.raises(InvalidParameterError, match="would pass this version's memory"):
        evaluate(note, rows, cache)
    assert len(cache) == 0


def test_a_field_past_the_columns_memory_budget_is_refused_not_scanned() -> None:
    rows = [{"label": "shoes", "metadata": {"sku": f"s{i}"}} for i in range(20)]
    items = CountingItems(rows)
    cache = ColumnCache(max_bytes=4 * len(rows) + 200)  # the label column and its one value
    shoes = parse_filter(["shoes"], None)
    assert shoes is not None and evaluate(shoes, items, cache).sum() == 20
    sku = parse_filter(None, {"sku": "s1"})
    assert sku is not None
    with pytest.raises(InvalidParameterError, match="would pass this version's memory"):
        evaluate(sku, items, cache)
    assert items.reads == len(rows)


# --- masked search on an index --------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IndexReader, np.ndarray]]:
    vectors = unit(np.random.default_rng(0).normal(size=(3000, 8)))
    path = tmp_path_factory.mktemp("index") / "index.ann"
    build_index(vectors, 8, path)
    opened = IndexReader(path, 8)
    yield opened, vectors
    opened.close()


def exact(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask)
    return rows[np.argsort(-(vectors[rows] @ query), kind="stable")][:k].tolist()


@pytest.fixture(params=["exact", "annoy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each search path: exact over the matching rows, or over-fetching Annoy."""
    if request.param == "annoy":
        monkeypatch.setattr(index, "FILTER_EXACT_ROWS", 0)
        monkeypatch.setattr(index, "FILTER_EXACT_COST", 1e9)  # exact only once Annoy would scan it all
    else:
        monkeypatch.setattr(index, "FILTER_EXACT_ROWS", 10**9)
    return request.param


def test_item_vectors_are_the_indexed_vectors(reader: tuple[IndexReader, np.ndarray]) -> None:
    opened, vectors = reader
    some = np.array([0, 5, 2999, 5])
    assert np.array_equal(opened.item_vectors(some), vectors[some])
    slow = IndexReader(opened.path, 8)
    slow._matrix = False  # as if the file's layout were not the expected one: ask Annoy row by row
    assert np.allclose(slow.item_vectors(some), vectors[some])


@pytest.mark.parametrize("fraction", [0.9, 0.3, 0.05, 0.004, 0.0005])
def test_filters_never_return_a_non_matching_item_and_return_k_when_k_match(
    reader: tuple[IndexReader, np.ndarray], path: str, fraction: float
) -> None:
    opened, vectors = reader
    rng = np.random.default_rng(int(fraction * 1e4))
    for _ in range(20):
        mask = rng.random(len(vectors)) < fraction
        query = unit(rng.normal(size=8))
        for k in (1, 10):
            found = opened.query_masked(query, k, mask)
            ids = [n.id for n in found]
            assert all(mask[ids]) and len(set(ids)) == len(ids)
            assert len(found) == min(k, int(mask.sum()))
            scores = [n.score for n in found]
            assert scores == sorted(scores, reverse=True)
            if path == "exact":
                assert ids == exact(vectors, query, k, mask)


def test_when_annoy_finds_too_few_it_searches_deeper_then_exactly(
    reader: tuple[IndexReader, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, vectors = reader
    monkeypatch.setattr(index, "FILTER_EXACT_ROWS", 0)
    # 300 rows of exact search cost 45,000 nodes: Annoy twice (search_k 15,000 then 30,000), then exact
    monkeypatch.setattr(index, "FILTER_EXACT_COST", 150)
    query = vectors[0]
    mask = np.zeros(len(vectors), dtype=bool)
    farthest = np.argsort(vectors @ query)[:300]  # the matching rows are the least similar ones
    mask[farthest] = True
    calls: list[int] = []
    real = opened.candidates
    monkeypatch.setattr(opened, "candidates", lambda v, n, sk: calls.append(n) or real(v, n, sk))
    found = [n.id for n in opened.query_masked(query, 10, mask)]
    assert found == exact(vectors, query, 10, mask)
    assert calls == [200, 400]  # grown before giving up on Annoy


def test_no_matching_row_gives_no_result(reader: tuple[IndexReader, np.ndarray]) -> None:
    opened, vectors = reader
    assert opened.query_masked(vectors[0], 10, np.zeros(len(vectors), dtype=bool)) == []


def test_groups_give_k_distinct_items_each_by_its_best_row(
    reader: tuple[IndexReader, np.ndarray], path: str
) -> None:
    opened, vectors = reader
    groups = np.arange(len(vectors)) // 3  # three photos per item
    rng = np.random.default_rng(7)
    for fraction in (0.5, 0.02):
        mask = rng.random(len(vectors)) < fraction
        query = unit(rng.normal(size=8))
        found = opened.query_masked(query, 10, mask, groups)
        ids = [n.id for n in found]
        assert all(mask[ids]) and len(found) == min(10, len(np.unique(groups[mask])))
        assert len(set(groups[ids])) == len(ids)  # distinct items
        if path == "exact":  # each item's best matching row, items by that score
            best: dict[int, int] = {}
            for row in exact(vectors, query, len(vectors), mask):
                best.setdefault(int(groups[row]), row)
            assert ids == list(best.values())[:10]


def test_groups_with_fewer_matching_items_than_k_return_them_all(
    reader: tuple[IndexReader, np.ndarray],
) -> None:
    opened, vectors = reader
    groups = np.zeros(len(vectors), dtype=np.int64)
    groups[1::2] = 1  # two items: even rows and odd rows
    found = opened.query_masked(vectors[3], 5, np.ones(len(vectors), dtype=bool), groups)
    assert [n.id for n in found][0] == 3 and sorted(groups[[n.id for n in found]]) == [0, 1]


def test_an_index_with_annoys_default_search_k_filters_too(reader: tuple[IndexReader, np.ndarray]) -> None:
    opened, vectors = reader
    default = IndexReader(opened.path, 8, search_k=-1)
    mask = np.arange(len(vectors)) % 2 == 0
    found = default.query_masked(vectors[1], 10, mask)
    assert len(found) == 10 and all(mask[[n.id for n in found]])


# --- through the API ----------------------------------------------------------------------------

COLOURS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[FlaskClient]:
    """`food` trained on the test photos (4 variants each) with a colour, a price and a flag."""
    files: dict[str, bytes] = {}
    meta = []
    for p, name in enumerate(TEST_PHOTOS):
        for v, (variant, image) in enumerate(list(demo.photo_variants(demo.photo(name)))[:4]):
            filename = f"{name}/{variant}.jpg"
            files[filename] = demo.jpeg(image)
            n = p * 4 + v
            meta.append({"filename": filename, "colour": COLOURS[n % 3], "price": n * 5, "sale": n % 2 == 0})
    files["metadata.jsonl"] = "\n".join(json.dumps(m) for m in meta).encode()
    app = create_app(settings_for(tmp_path_factory.mktemp("shop"), models_dir))
    client = app.test_client()
    job = train(client, "food", make_zip(files))
    assert job["status"] == "succeeded", job
    wait_serving(client, "food", job["version"])
    yield client
    app.extensions["simsvc"].close()


def where(value: Any) -> str:
    return "where=" + quote(json.dumps(value))


def infer(client: FlaskClient, query: str, photo: str = "rocket") -> Any:
    return client.post(f"/food/infer?{query}", data=demo.jpeg(demo.photo(photo)), content_type="image/jpeg")


def results(response: Any) -> list[dict[str, Any]]:
    body = response.get_json()
    assert response.status_code == 200, body
    return body["results"]


def test_infer_filters_by_label(shop: FlaskClient) -> None:
    found = results(infer(shop, "k=10&label=moon&label=coffee"))
    assert len(found) == 8 and {r["label"] for r in found} == {"moon", "coffee"}
    assert results(infer(shop, "k=3&label=moon", photo="moon"))[0]["name"] == "moon/original.jpg"


@pytest.mark.parametrize(
    ("condition", "keep"),
    [
        ({"colour": "red"}, lambda m: m["colour"] == "red"),
        ({"colour": ["red", "green"]}, lambda m: m["colour"] in ("red", "green")),
        ({"price": {"min": 20, "max": 60}}, lambda m: 20 <= m["price"] <= 60),
        ({"sale": True, "price": {"max": 50}}, lambda m: m["sale"] is True and m["price"] <= 50),
    ],
)
def test_infer_and_similar_filter_by_metadata(
    shop: FlaskClient, condition: dict[str, Any], keep: Any
) -> None:
    everything = results(infer(shop, "k=100"))
    expected = [r for r in everything if keep(r["metadata"])]
    found = results(infer(shop, f"k=100&{where(condition)}"))
    assert [r["id"] for r in found] == [r["id"] for r in expected]  # all of them, in the same order
    top = results(infer(shop, f"k=3&{where(condition)}"))
    assert [r["id"] for r in top] == [r["id"] for r in expected[:3]]
    item = everything[0]["id"]
    similar = shop.get(f"/food/items/{item}/similar?k=100&{where(condition)}").get_json()["results"]
    assert {r["id"] for r in similar} == {r["id"] for r in expected} - {item}
    assert all(keep(r["metadata"]) for r in similar)


def test_similar_filters_by_label_and_excludes_the_item(shop: FlaskClient) -> None:
    item = results(infer(shop, "k=1", photo="chelsea"))[0]["id"]
    found = shop.get(f"/food/items/{item}/similar?k=5&label=chelsea").get_json()["results"]
    assert len(found) == 3 and item not in [r["id"] for r in found]
    assert {r["label"] for r in found} == {"chelsea"}


def test_a_filter_nothing_matches_gives_no_results(shop: FlaskClient) -> None:
    assert results(infer(shop, "label=nothing-like-this")) == []


@pytest.mark.parametrize(
    ("query", "field", "problem"),
    [
        ("where=%7Bnope", "where", "not valid JSON"),
        (where({"price": {"min": 9, "max": 1}}), "where", "min 9 is greater than max 1"),
        (where({"colour": []}), "where", "empty list"),
        (where({"price": {"from": 1}}), "where", "unknown range key"),
        ("label=", "label", "a label has 1 to 200 characters"),
    ],
)
def test_a_malformed_filter_is_422_naming_the_problem(
    shop: FlaskClient, query: str, field: str, problem: str
) -> None:
    for response in (infer(shop, query), shop.get(f"/food/items/0/similar?{query}")):
        body = response.get_json()
        assert response.status_code == 422 and body["code"] == 422, body
        assert problem in body["errors"][field][0] and problem in body["message"]


def test_the_filter_is_documented_in_openapi(shop: FlaskClient) -> None:
    spec = shop.get("/openapi.json").get_json()
    for route, method in (("/{name}/infer", "post"), ("/{name}/items/{item_id}/similar", "get")):
        params = {p["name"]: p for p in spec["paths"][route][method]["parameters"]}
        assert params["where"]["in"] == "query" and "min" in params["where"]["description"]
        assert params["where"]["schema"]["example"] and params["label"]["schema"]["type"] == "array"
