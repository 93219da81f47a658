"""Filtered search: recall@10 and latency of `where=` filters on 100,000 vectors, against exact search
over the matching rows, at selectivities 50%, 10%, 1% and 0.1%.

The vectors are bench/perf.py's clustered 256-d unit vectors in a 32-tree index (the endpoints'
settings); each row's metadata holds `shard`, a uniform integer 0..999 drawn independently of its
vector, and the filter is a range on it (`{"shard": {"max": 499}}` keeps 50%). The filtered search
is what a request runs: the filter evaluated over the version's cached columns, then
`IndexReader.query_masked`. The reference is numpy brute force over the matching rows with every
vector in memory. Alone: `python -m bench.filters` (prints the table, writes nothing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.perf import DIM, clustered
from service.catalog import index as index_module
from service.catalog import jsonmap
from service.catalog.index import IndexReader, build_index
from service.core.config import ROOT
from service.serving.filters import ColumnCache, evaluate, parse_filter

N = 100_000
N_TREES = 32
K = 10
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def run() -> dict[str, Any]:
    data, queries = clustered(N, DIM, seed=N)
    shard = np.random.default_rng(1).integers(0, 1000, N)
    (ROOT / "cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        build_index(data, N_TREES, work / "index.ann")
        jsonmap.write(
            work / "metadata.json",
            (
                {"label": None, "metadata": {"shard": int(s)}, "image": f"images/{i}.png"}
                for i, s in enumerate(shard)
            ),
        )
        items = jsonmap.JsonLinesMap(work / "metadata.json", N)
        reader = IndexReader(work / "index.ann", DIM)
        cache = ColumnCache()
        rounds = [0]  # Annoy calls made by the current query (0: exact search)
        candidates = reader.candidates

        def counted(vector: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
            rounds[-1] += 1
            return candidates(vector, n, search_k)

        reader.candidates = counted  # type: ignore[method-assign]

        started = time.perf_counter()
        first = parse_filter(None, {"shard": {"max": 0}})
        assert first is not None
        evaluate(first, items, cache)  # builds the column: one pass over the metadata
        column_s = time.perf_counter() - started

        unfiltered = []
        for q in queries:
            started = time.perf_counter()
            reader.query(q, K)
            unfiltered.append(time.perf_counter() - started)

        rows = []
        for selectivity in SELECTIVITIES:
            flt = parse_filter(None, {"shard": {"max": round(selectivity * 1000) - 1}})
            assert flt is not None
            matching = np.flatnonzero(evaluate(flt, items, cache))
            for q in queries[:20]:  # warm: the first touches of the mmapped pages are page faults
                reader.query_masked(q, K, evaluate(flt, items, cache))
            filtered_s, exact_s, recalls, annoy_rounds = [], [], [], []
            for q in queries:
                rounds.append(0)
                started = time.perf_counter()
                found = reader.query_masked(q, K, evaluate(flt, items, cache))
                filtered_s.append(time.perf_counter() - started)
                annoy_rounds.append(rounds.pop())
                started = time.perf_counter()
                scores = data[matching] @ q
                truth = matching[np.argpartition(-scores, K - 1)[:K]]
                exact_s.append(time.perf_counter() - started)
                ids = [n.id for n in found]
                assert len(ids) == K and all(shard[i] < selectivity * 1000 for i in ids)
                recalls.append(len(set(ids) & set(truth.tolist())) / K)
            rows.append(
                {
                    "selectivity": selectivity,
                    "matching": len(matching),
                    "recall@10": round(float(np.mean(recalls)), 3),
                    "min_recall@10": round(float(np.min(recalls)), 1),
                    "filtered": percentiles(filtered_s),
                    "exact": percentiles(exact_s),
                    "annoy_share": round(float(np.mean([r > 0 for r in annoy_rounds])), 2),
                    "annoy_rounds": round(float(np.mean([r for r in annoy_rounds if r] or [0])), 2),
                }
            )
            print(f"  filters {selectivity:.1%}: {rows[-1]}", flush=True)
        reader.close()
        cycling = cycling_fields(work)
    return {
        "cycling": cycling,
        "n": N,
        "queries": len(queries),
        "search_k": reader.search_k,
        "column_s": round(column_s, 2),
        "unfiltered": percentiles(unfiltered),
        "rows": rows,
        "params": {
            name: getattr(index_module, name)
            for name in (
                "FILTER_EXACT_ROWS",
                "FILTER_EXACT_COST",
                "FILTER_N_MARGIN",
                "FILTER_SEARCH_K_MARGIN",
            )
        },
    }


FIELDS = 100  # metadata fields per row in the cycling-fields part
CYCLE = 4  # sets of FIELDS // CYCLE fields, queried in turn


def cycling_fields(work: Path, rounds: int = 10) -> dict[str, Any]:
    """A filter naming other fields on every query (four sets of 25 of 100 fields, in turn) against
    the same filter repeated, over 100,000 rows: each set's first query builds its columns (one pass
    over the rows), and none after it reads the metadata again."""
    rng = np.random.default_rng(2)
    values = rng.integers(0, 50, size=(N, FIELDS))
    jsonmap.write(
        work / "wide.json",
        ({"label": "x", "metadata": {f"f{j}": int(v) for j, v in enumerate(row)}} for row in values),
    )
    items = jsonmap.JsonLinesMap(work / "wide.json", N)
    per_set = FIELDS // CYCLE
    sets = [
        flt
        for c in range(CYCLE)
        if (flt := parse_filter(None, {f"f{j}": {"max": 40} for j in range(c * per_set, (c + 1) * per_set)}))
    ]
    cache = ColumnCache()
    first_round = []
    for flt in sets:
        started = time.perf_counter()
        evaluate(flt, items, cache)
        first_round.append(time.perf_counter() - started)
    cycling, repeated = [], []
    for _ in range(rounds):
        for flt in sets:
            started = time.perf_counter()
            evaluate(flt, items, cache)
            cycling.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluate(sets[0], items, cache)
            repeated.append(time.perf_counter() - started)
    out = {
        "rows": N,
        "fields": FIELDS,
        "first_round_s": [round(x, 2) for x in first_round],
        "cycling": percentiles(cycling),
        "repeated": percentiles(repeated),
        "columns": len(cache),
    }
    print(f"  cycling fields: {out}", flush=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [
        "## Filtered search",
        "",
        f"{r['n']:,} clustered synthetic {DIM}-d unit vectors, {N_TREES} trees. A range filter on a "
        f"metadata field drawn independently of the vectors; {r['queries']} queries "
        f"per selectivity, k = {K}. Filtered = what a request runs after embedding (the filter evaluated "
        "over the cached columns, then `IndexReader.query_masked`); exact = numpy brute force over the "
        "matching rows, every vector in memory; recall@10 of filtered against exact. Rules "
        f"(service/catalog/index.py): exact search when at most {p['FILTER_EXACT_ROWS']:,} rows match or "
        f"when reading them costs less than the nodes Annoy would inspect (one row = "
        f"{p['FILTER_EXACT_COST']:g} nodes); else Annoy with n = k / fraction × {p['FILTER_N_MARGIN']:g} and "
        f"search_k = {r['search_k']:,} / fraction × {p['FILTER_SEARCH_K_MARGIN']:g}, doubled until k match. "
        f"Unfiltered Annoy search for comparison: p50 {r['unfiltered']['p50']} ms, p95 "
        f"{r['unfiltered']['p95']} ms. Building the filter column on first use (one pass over "
        f"{r['n']:,} rows of metadata): {r['column_s']} s.",
        "",
        "| selectivity | matching rows | recall@10 | worst query | filtered p50 ms | filtered p95 ms "
        "| exact p50 ms | exact p95 ms | on Annoy | Annoy rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['selectivity']:.1%} | {row['matching']:,} | **{row['recall@10']}** | "
            f"{row['min_recall@10']} | {row['filtered']['p50']} | {row['filtered']['p95']} | "
            f"{row['exact']['p50']} | {row['exact']['p95']} | {row['annoy_share']:.0%} | "
            f"{row['annoy_rounds']} |"
        )
    c = r["cycling"]
    lines += [
        "",
        f"**Filters naming new fields on every query** ({c['rows']:,} rows of {c['fields']} metadata "
        f"fields; four sets of 25 fields, each a range, queried in turn): each set's first query builds "
        f"its 25 columns in one pass over the rows ({', '.join(f'{x} s' for x in c['first_round_s'])}; "
        f"once per version, field and process: {c['columns']} columns, kept within 256 MB); after "
        f"that, a query cycling through the sets takes p50 {c['cycling']['p50']} ms "
        f"(p95 {c['cycling']['p95']}) against {c['repeated']['p50']} ms for the same filter repeated: "
        f"**×{c['cycling']['p50'] / max(c['repeated']['p50'], 1e-9):.2f}** (it was ×154 when each new "
        "field meant a pass over the rows).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run()))
