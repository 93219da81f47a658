"""Service, the one way in, called directly (no HTTP): what the views and the CLI get back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from bench import demo
from service.application.results import ChangeOutcome, Health, ImageSource, VersionList
from service.application.service import Service
from service.core.errors import ConflictError, EndpointNotFoundError, ItemNotFoundError, NotFoundError


@pytest.fixture
def service(make_app: Callable[..., Flask], photos_zip: Path) -> Service:
    svc: Service = make_app(warm_on_start=False).extensions["simsvc"]
    svc.train_now("food", photos_zip, "never", lambda progress: None)
    return svc


def route(item_id: int, photo: int, version: str) -> str:
    return f"route:{item_id}:{photo}:{version}"


def test_health_shows_the_worker_only_to_those_who_may_see_it(service: Service) -> None:
    assert service.health(details=False) == Health()
    shown = service.health(details=True)
    assert shown.worker is not None and set(shown.endpoints or {}) == {"fashion", "food"}


def test_queries_return_results_and_image_sources(service: Service) -> None:
    args = service.search_args("food", 3, None, None)
    found = service.infer("food", [("q.jpg", demo.jpeg(demo.photo("moon")))], args, route)
    best = found.results[0][0]
    assert best["name"] == "moon/moon-original.jpg" and best["image_url"].startswith(f"route:{best['id']}:0:")
    similar = service.similar("food", best["id"], args, route)
    assert best["id"] not in [r["id"] for r in similar.results[0]] and similar.id == best["id"]
    image = service.item_image("food", best["id"], 0, None)
    assert isinstance(image, ImageSource) and image.mimetype == "image/jpeg" and image.path is not None
    with pytest.raises(ItemNotFoundError):
        service.item_image("food", best["id"], 5, None)


def test_changes_and_versions_through_service(service: Service) -> None:
    args = service.search_args("food", 1, None, None)
    moon = service.infer("food", [("q.jpg", demo.jpeg(demo.photo("moon")))], args, route).results[0][0]
    edited = service.edit_item("food", moon["id"], {"label": "space"})
    assert isinstance(edited, ChangeOutcome) and edited.kind == "edit" and edited.items == [moon["id"]]
    deleted = service.delete_items("food", [moon["id"]], [])
    assert deleted.count == edited.count - 1
    listed = service.versions_of("food")
    assert isinstance(listed, VersionList) and listed.current == deleted.version and len(listed.versions) == 3
    first = listed.versions[0].version
    back = service.rollback("food", first)  # notes the version for this instance: read-your-writes
    assert back.current == first and service.endpoint("food").current().version == first
    with pytest.raises(ConflictError):
        service.delete_version("food", first)  # the current one
    assert [v.version for v in service.delete_version("food", deleted.version).versions] == [
        listed.versions[0].version,
        listed.versions[1].version,
    ]
    with pytest.raises(NotFoundError):
        service.rollback("food", deleted.version)


def test_unknown_endpoints_are_refused_by_every_method(service: Service) -> None:
    for call in (
        lambda: service.endpoint_status("shoes"),
        lambda: service.versions_of("shoes"),
        lambda: service.delete_items("shoes", [1], []),
        lambda: service.search_args("shoes", None, None, None),
    ):
        with pytest.raises(EndpointNotFoundError):
            call()
