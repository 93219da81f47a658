"""Hostile ids and bodies on the item routes and /compact: clear JSON errors, nothing published."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask

from tests.helpers import make_zip, photo_jpeg, upload

AUTH = {"Authorization": "Bearer secret-admin-token-0123456789"}


def test_hostile_ids_and_bodies_are_clear_errors_and_publish_nothing(make_app: Callable[..., Flask]) -> None:
    app = make_app(admin_token=AUTH["Authorization"].split()[1])
    client = app.test_client()
    r = client.post(
        "/food/train",
        data={
            "file": upload(make_zip({"p/a.jpg": photo_jpeg("astronaut"), "p/c.jpg": photo_jpeg("coffee")}))
        },
        headers=AUTH,
    )
    assert r.status_code == 202
    for _ in range(300):
        if client.get(r.get_json()["status_url"]).get_json()["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    v = client.get("/food").get_json()["version"]
    out = {}
    out["compact_noauth"] = client.post("/food/compact").status_code
    out["compact_auth"] = client.post("/food/compact", headers=AUTH).status_code
    out["compact_unknown_ep"] = client.post("/nope/compact", headers=AUTH).status_code
    for name, ids in {
        "neg": [-1],
        "huge": [2**63],
        "huger": [2**80],
        "many": list(range(10**6, 10**6 + 50000)),
    }.items():
        resp = client.delete("/food/items", json={"ids": ids}, headers=AUTH)
        out[name] = (resp.status_code, (resp.get_json() or {}).get("message", "")[:80])
    out["path_huge"] = client.delete(f"/food/items/{2**70}", headers=AUTH).status_code
    out["patch_huge"] = client.patch(f"/food/items/{2**70}", json={"label": "x"}, headers=AUTH).status_code
    out["ids_str"] = client.delete("/food/items", json={"ids": ["a"]}, headers=AUTH).status_code
    out["ids_null"] = client.delete("/food/items", json={"ids": None}, headers=AUTH).status_code
    out["names_empty"] = client.delete("/food/items", json={"ids": [], "names": []}, headers=AUTH).status_code
    out["delete_all"] = client.delete(
        "/food/items", json={"names": ["p/a.jpg", "p/c.jpg"]}, headers=AUTH
    ).status_code
    out["similar_huge"] = client.get(f"/food/items/{2**70}/similar").status_code
    out["image_huge"] = client.get(f"/food/items/{2**70}/image").status_code
    assert out == {
        "compact_noauth": 401,
        "compact_auth": 409,  # nothing to compact
        "compact_unknown_ep": 404,
        "neg": (404, "no item -1 in food; nothing was changed"),
        "huge": (404, f"no item {2**63} in food; nothing was changed"),
        "huger": (404, f"no item {2**80} in food; nothing was changed"),
        "many": out["many"],
        "path_huge": 404,
        "patch_huge": 404,
        "ids_str": 422,
        "ids_null": 422,
        "names_empty": 422,
        "delete_all": 409,  # a catalog keeps at least one item
        "similar_huge": 404,
        "image_huge": 404,
    }
    assert out["many"][0] == 404 and out["many"][1].startswith("no item 1000000, 1000001")
    assert client.get("/food").get_json()["version"] == v
