"""The web page at GET /: served with its own strict CSP, and used in a real headless Chromium.

The browser tests run Debian's Chromium (`apt-get install chromium`, installed by .ci/run) through
Playwright for Python, against the Procfile's gunicorn with tokens set (so the page has to send
them), on a `food` endpoint trained on the test photos. Every request the browser makes is
recorded and must stay on the service's origin; every test leaves a screenshot in its tmp_path.
"""

from __future__ import annotations

import base64
import html.parser
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from flask import Flask
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from bench import demo
from service.api.app import API_CSP
from service.api.routes.page import STATIC
from tests.helpers import TEST_PHOTOS, Server, make_zip, procfile_server

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never a downloaded browser
ADMIN = "page-admin-token-0123456789"
QUERY = "page-query-token-0123456789"

expect.set_options(timeout=30_000)  # two cores: a search or a job can take a few seconds


# --- without a browser: the route, its headers and its files -----------------------------------------


class _Markup(html.parser.HTMLParser):
    """What the page's HTML asks for: scripts, styles, other URLs, and anything inline."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts.append(named)
            self._in_script = True
        if tag == "style":
            self.inline.append("<style>")
        for key, value in attrs:
            if key == "style" or key.startswith("on"):
                self.inline.append(f"<{tag} {key}>")
            if key in ("src", "href") and value:
                self.urls.append(value)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("<script> body")


def test_the_page_and_its_files_are_served_with_a_strict_csp(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    with client.get("/") as page:
        markup = _Markup()
        markup.feed(page.get_data(as_text=True))
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["img-src"] == "'self' blob: data:" and directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and "unsafe" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"

    assert markup.inline == [], "inline scripts, styles or handlers would need 'unsafe-inline'"
    assert [s.get("src") for s in markup.scripts] == ["/static/app.js"]
    assert all(url.startswith("/static/") or url.startswith("#") for url in markup.urls), markup.urls
    modules = sorted(STATIC.glob("*.js"))
    assets = [(f"/static/{m.name}", "text/javascript") for m in modules]
    assets += [("/static/style.css", "text/css"), ("/static/favicon.svg", "image/svg+xml")]
    for url, mimetype in assets:
        with client.get(url) as asset:
            assert asset.status_code == 200 and asset.mimetype == mimetype, url
            assert asset.get_data() == (STATIC / url.removeprefix("/static/")).read_bytes()
    for module in modules:
        script = module.read_text()
        # Built from text only: nothing a Trusted Types CSP would refuse.
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script), module
        # Every module it imports is there (no build step resolves them: the browser does).
        for imported in re.findall(r'^import .* from "\./([\w-]+\.js)";', script, re.M):
            assert (STATIC / imported).is_file(), f"{module.name} imports missing {imported}"

    # The JSON routes keep their own CSP; the page is not part of the API's description.
    assert client.get("/health").headers["Content-Security-Policy"] == API_CSP
    assert client.get("/static/missing.js").status_code == 404
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_the_page_needs_no_token_but_what_it_calls_does(make_app: Callable[..., Flask]) -> None:
    client = make_app(admin_token=ADMIN, query_token=QUERY).test_client()
    with client.get("/") as page, client.get("/static/app.js") as script:
        assert page.status_code == 200 and script.status_code == 200
    assert client.get("/endpoints").status_code == 401
    assert client.get("/endpoints", headers=auth(QUERY)).status_code == 200


def test_with_images_in_s3_the_page_may_show_them_from_the_bucket(
    make_app: Callable[..., Flask], s3_config: dict[str, Any]
) -> None:
    # Results point at pre-signed S3 URLs there: the bucket's origin is allowed for images only.
    client = make_app(**s3_config).test_client()
    with client.get("/") as page:
        csp = page.headers["Content-Security-Policy"]
    img_src = next(d for d in csp.split(";") if d.strip().startswith("img-src"))
    assert img_src.split() == ["img-src", "'self'", "blob:", "data:", s3_config["s3_endpoint_url"]]
    assert "connect-src 'self';" in csp


# --- in a real browser ----------------------------------------------------------------------------------


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def train_food(server: Server, zip_path: Path) -> dict[str, Any]:
    response = requests.post(
        f"{server.url}/food/train",
        files={"file": ("photos.zip", zip_path.read_bytes(), "application/zip")},
        data={"fine_tune": "never"},
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    for _ in range(600):
        job = requests.get(response.json()["status_url"], headers=auth(), timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"training did not finish: {job}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, photos_zip: Path) -> Iterator[Server]:
    env = {
        "WEB_CONCURRENCY": "1",
        "MODELS_DIR": str(models_dir),
        "WATCH_INTERVAL_S": "0.5",
        "ADMIN_TOKEN": ADMIN,
        "QUERY_TOKEN": QUERY,
    }
    with procfile_server(tmp_path_factory.mktemp("page"), env) as running:
        job = train_food(running, photos_zip)
        assert job["status"] == "succeeded", job
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), "install Debian's chromium (apt-get install chromium; make test does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Pages:
    """Opens pages on the server; records what each asks for and what its console says."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.browser, self.server = browser, server
        self.contexts: list[BrowserContext] = []
        self.pages: list[Page] = []
        self.requests: list[str] = []
        self.console: list[str] = []

    def open(self, token: str | None = ADMIN, endpoint: str = "food", **context_options: Any) -> Page:
        context = self.browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
        self.contexts.append(context)
        context.on("request", lambda request: self.requests.append(request.url))
        page = context.new_page()
        self.pages.append(page)
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        # File choosers are intercepted from now on: turned on only inside expect_file_chooser, the
        # interception can race the click that opens one.
        page.on("filechooser", lambda chooser: None)
        page.goto(f"{self.server.url}/?endpoint={endpoint}")
        if token:
            page.get_by_label("Access token").fill(token)
            page.get_by_role("button", name="Use", exact=True).click()
            expect(page.locator("#summary-facts")).to_contain_text("ready")
        return page

    def off_origin(self) -> list[str]:
        origin = urlsplit(self.server.url)
        outside = []
        for url in self.requests:
            inner = url.removeprefix("blob:")
            parts = urlsplit(inner)
            if url.startswith("data:") or (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc):
                continue
            outside.append(url)
        return outside


@pytest.fixture
def pages(browser: Browser, server: Server, tmp_path: Path) -> Iterator[Pages]:
    opened = Pages(browser, server)
    try:
        yield opened
    finally:
        for i, page in enumerate(opened.pages):
            page.screenshot(path=str(tmp_path / f"page-{i}.png"), full_page=True)
        for context in opened.contexts:
            context.close()
    assert opened.requests, "the browser made no request"
    assert opened.off_origin() == [], "the page loaded something from outside the service"
    violations = [line for line in opened.console if "Content Security Policy" in line or "pageerror" in line]
    assert violations == [], violations


def photo_file(name: str, variant: str | None = None) -> dict[str, Any]:
    image = demo.photo(name)
    if variant is not None:
        image = dict(demo.photo_variants(image))[variant]
    return {"name": f"{name}.jpg", "mimeType": "image/jpeg", "buffer": demo.jpeg(image)}


def search(page: Page, name: str) -> None:
    page.locator("#photo-file").set_input_files(photo_file(name))
    expect(page.locator("#results-title")).to_have_text("Matches for your photo")
    expect(page.locator("#grid li").first).to_be_visible()


def loaded(page: Page, selector: str) -> bool:
    """Whether the image under `selector` really loaded (decoded, with a width)."""
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def wait_loaded(page: Page, selector: str) -> None:
    page.wait_for_function(
        "s => { const img = document.querySelector(s); return img && img.complete && img.naturalWidth > 0; }",
        arg=selector,
    )


def names(page: Page) -> list[str]:
    return page.locator("#grid li").evaluate_all("items => items.map(li => li.dataset.name)")


def test_search_with_a_photo_shows_the_matches_with_their_images(pages: Pages) -> None:
    page = pages.open()
    expect(page.locator("#summary-facts div", has_text="Items")).to_have_text(f"Items{5 * len(TEST_PHOTOS)}")
    expect(page.locator("#summary-facts div", has_text="Encoder")).to_have_text("EncoderLiteRT (converted)")
    expect(page.locator("#endpoint")).to_have_value("food")
    expect(page.locator("#label-chips button")).to_have_count(len(TEST_PHOTOS))

    search(page, "coffee")
    first = page.locator("#grid li").first
    expect(first).to_have_attribute("data-name", "coffee/coffee-original.jpg")
    expect(first.locator(".score")).to_have_text("1.000")
    expect(first.locator(".tag")).to_have_text("coffee")
    expect(first.locator(".result-metadata")).to_contain_text("coffee (original)")
    expect(page.locator("#grid li")).to_have_count(10)  # the endpoint's default k
    wait_loaded(page, "#grid li:first-child img")
    assert page.locator("#query-preview").is_visible()
    # The page never sent the token in a URL; images come from signed URLs.
    src = first.locator("img").get_attribute("src")
    assert src and "sig=" in src and ADMIN not in src and QUERY not in src


def test_label_chips_and_metadata_filters_narrow_the_matches(pages: Pages) -> None:
    page = pages.open()
    search(page, "coffee")
    chip = page.locator('#label-chips [data-label="rocket"]')
    chip.focus()
    page.keyboard.press("Enter")  # chips are buttons: usable from the keyboard
    expect(chip).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#results-note")).to_contain_text("(filtered)")
    expect(page.locator("#grid li")).to_have_count(5)
    assert set(page.locator("#grid li").evaluate_all("items => items.map(li => li.dataset.label)")) == {
        "rocket"
    }

    page.get_by_role("button", name="Add a metadata filter").click()
    condition = page.get_by_role("group", name="Metadata filter 1")
    condition.get_by_label("Field").fill("title")
    condition.get_by_label("Value").fill("rocket (mirror)")
    condition.get_by_label("Value").press("Tab")
    expect(page.locator("#grid li")).to_have_count(1)
    assert names(page) == ["rocket/rocket-mirror.jpg"]

    # Off again: every label's matches come back.
    condition.get_by_role("button", name="Remove metadata filter 1").click()
    chip.click()
    expect(page.locator("#grid li")).to_have_count(10)
    assert names(page)[0] == "coffee/coffee-original.jpg"


def test_clicking_a_result_shows_the_items_similar_to_it(pages: Pages) -> None:
    page = pages.open()
    search(page, "coffee")
    first = page.locator("#grid li").first
    expect(first).to_have_attribute("data-name", "coffee/coffee-original.jpg")
    item_id = first.get_attribute("data-id")
    first.get_by_role("button", name="More like coffee/coffee-original.jpg").click()
    expect(page.locator("#results-title")).to_have_text("Similar to coffee/coffee-original.jpg")
    expect(page.locator(f'#grid li[data-id="{item_id}"]')).to_have_count(0)  # not itself
    expect(page.locator("#grid li").first).to_have_attribute("data-label", "coffee")
    wait_loaded(page, "#grid li:first-child img")

    page.get_by_role("button", name="Back to the matches for your photo").click()
    expect(page.locator("#results-title")).to_have_text("Matches for your photo")
    expect(page.locator("#grid li").first).to_have_attribute("data-id", item_id)


def test_errors_show_the_message_the_api_returned(pages: Pages, server: Server) -> None:
    # No token yet: the service's own 401 message, and a hint to enter the token.
    page = pages.open(token=None)
    expected = requests.get(f"{server.url}/endpoints", timeout=10).json()["message"]
    expect(page.locator("#error-text")).to_have_text(expected)
    expect(page.locator("#endpoint-summary")).to_contain_text("needs an access token")

    page.get_by_label("Access token").fill(QUERY)
    page.get_by_label("Access token").press("Enter")
    expect(page.locator("#summary-facts")).to_contain_text("ready")
    expect(page.locator("#error")).to_be_hidden()

    # A file that is not an image: the service's 400 message, word for word.
    junk = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"this is not a jpeg"}
    answer = requests.post(
        f"{server.url}/food/infer",
        files={"image": ("notes.jpg", junk["buffer"], "image/jpeg")},
        headers=auth(QUERY),
        timeout=30,
    )
    assert answer.status_code == 400
    page.locator("#photo-file").set_input_files(junk)
    expect(page.locator("#error-text")).to_have_text(answer.json()["message"])

    # A query token may not write: the service's 403 message.
    page.get_by_label("Zip of images").set_input_files(
        {"name": "x.zip", "mimeType": "application/zip", "buffer": make_zip({"a/x.txt": b"x"})}
    )
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.locator("#error-text")).to_have_text("this token may not do that")
    expect(page.locator("#job")).to_have_attribute("data-status", "failed")


def test_an_older_answer_arriving_last_does_not_undo_a_newer_one(pages: Pages, server: Server) -> None:
    # The page loads the endpoints at once, without a token (a 401), and again when one is entered.
    # Here the first answer is held back until the second has been shown: arriving last, it must
    # not put back "needs an access token" (it did once in CI, on a slow machine).
    held: list[Route] = []

    def hold_the_tokenless_load(route: Route) -> None:
        if "authorization" in route.request.headers:
            route.continue_()
        else:
            held.append(route)

    context = pages.browser.new_context(viewport={"width": 1280, "height": 900})
    pages.contexts.append(context)
    context.on("request", lambda request: pages.requests.append(request.url))
    context.route(re.compile(r".*/endpoints$"), hold_the_tokenless_load)
    page = context.new_page()
    pages.pages.append(page)
    page.on("pageerror", lambda error: pages.console.append(f"pageerror: {error}"))
    page.goto(f"{server.url}/?endpoint=food")
    page.wait_for_function("() => document.readyState === 'complete'")
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, "the page did not load the endpoints"
        page.wait_for_timeout(20)
    page.get_by_label("Access token").fill(QUERY)
    page.get_by_role("button", name="Use", exact=True).click()
    expect(page.locator("#summary-facts")).to_contain_text("ready")

    with page.expect_response(lambda response: response.status == 401):
        held[0].continue_()  # the older load's 401 arrives now, after the newer load's answer
    page.wait_for_timeout(300)  # the page handles an answer as soon as it arrives
    expect(page.locator("#summary-facts")).to_contain_text("ready")
    expect(page.locator("#endpoint-summary")).not_to_contain_text("needs an access token")
    expect(page.locator("#error")).to_be_hidden()


def test_a_photo_can_be_dropped_or_pasted(pages: Pages) -> None:
    page = pages.open()
    give = """([how, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "given.jpg", {type: "image/jpeg"}));
        if (how === "drop") {
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        } else {
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
        }
    }"""
    for how, name in (("drop", "moon"), ("paste", "rocket")):
        photo = base64.b64encode(demo.jpeg(demo.photo(name))).decode()
        page.evaluate(give, [how, photo])
        expect(page.locator("#grid li").first).to_have_attribute("data-name", f"{name}/{name}-original.jpg")
        wait_loaded(page, "#query-preview")


def small_zip() -> bytes:
    files = {}
    for name in ("coins", "clock"):
        for variant, image in demo.photo_variants(demo.photo(name)):
            files[f"{name}/{name}-{variant}.jpg"] = demo.jpeg(image.resize((96, 96)))
    files["notes.txt"] = b"not an image"
    return make_zip(files)


def test_training_a_zip_shows_progress_skipped_files_metrics_and_the_new_version(pages: Pages) -> None:
    page = pages.open()
    page.get_by_label("Endpoint", exact=True).select_option("fashion")  # untrained here
    expect(page.locator("#summary-facts")).to_contain_text("not trained yet")
    expect(page.locator("#versions-body")).to_contain_text("No version yet")

    page.get_by_label("Zip of images").set_input_files(
        {"name": "small.zip", "mimeType": "application/zip", "buffer": small_zip()}
    )
    page.get_by_role("button", name="Train", exact=True).click()
    job = page.locator("#job")
    expect(job).to_have_attribute("data-status", "succeeded", timeout=120_000)
    bar = page.locator("#job-progress")
    assert bar.evaluate("p => p.value === p.max && p.max > 0")
    stage = page.locator("#job-stage").inner_text()
    version = re.fullmatch(r"Done: published version (\S+)", stage)
    assert version, stage
    version = version.group(1)

    skipped = page.locator("table.skipped")
    expect(skipped).to_contain_text("notes.txt")
    expect(skipped).to_contain_text("not a decodable image")
    expect(page.locator("table.metrics")).to_contain_text("precision@10")
    expect(page.locator("#job-result")).to_contain_text("10 images")

    expect(page.locator("#summary-facts")).to_contain_text(version)
    expect(page.locator("#summary-facts")).to_contain_text("ready")
    row = page.locator(f'#versions-body tr[data-version="{version}"]')
    expect(row).to_contain_text("serving")
    expect(page.locator("#label-chips button")).to_have_count(2)


def test_a_running_train_can_be_cancelled_from_the_page(pages: Pages) -> None:
    page = pages.open()
    served = lambda: requests.get(  # noqa: E731
        f"{pages.server.url}/food", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ).json()["version"]
    before = served()
    rng = np.random.default_rng(3)  # enough distinct photos to take a while to embed
    files = {
        f"{'ab'[i % 2]}/n-{i:04d}.jpg": demo.jpeg(
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        )
        for i in range(3000)
    }
    page.get_by_label("Zip of images").set_input_files(
        {"name": "many.zip", "mimeType": "application/zip", "buffer": make_zip(files)}
    )
    page.get_by_role("button", name="Train", exact=True).click()
    cancel = page.get_by_role("button", name="Cancel job")
    expect(cancel).to_be_visible(timeout=60_000)
    cancel.click()
    job = page.locator("#job")
    expect(job).to_have_attribute("data-status", "cancelled", timeout=120_000)
    expect(page.locator("#job-stage")).to_have_text("Cancelled: nothing was published.")
    expect(cancel).to_be_hidden()
    assert served() == before  # nothing was published


def test_adding_an_item_with_two_photos_then_editing_it(pages: Pages, tmp_path: Path) -> None:
    page = pages.open()
    moon = demo.photo("moon")
    photos = [
        {"name": "moon-a.jpg", "mimeType": "image/jpeg", "buffer": demo.jpeg(moon.rotate(90))},
        {"name": "moon-b.jpg", "mimeType": "image/jpeg", "buffer": demo.jpeg(moon.rotate(180))},
    ]
    add = page.get_by_role("form", name="Add to the catalogue")
    add.get_by_label("Images or a zip").set_input_files(photos)
    add.get_by_label("Label").fill("space")
    add.get_by_label("Metadata (a JSON object)").fill(
        '{"item": "moon-set", "price": 12, "size": {"w": 10, "h": 20}}'
    )
    add.get_by_role("button", name="Add", exact=True).click()
    expect(page.locator("#job")).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator("#job-result")).to_contain_text("items added or replaced")

    page.locator("#photo-file").set_input_files(
        {"name": "q.jpg", "mimeType": "image/jpeg", "buffer": demo.jpeg(moon.rotate(90))}
    )
    first = page.locator("#grid li").first
    expect(first).to_have_attribute("data-name", "moon-set")
    expect(first.locator(".photos-tag")).to_be_visible()
    first.get_by_role("button", name="Details of moon-set").click()

    dialog = page.locator("#item-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#item-photos figure")).to_have_count(2)
    for i in (1, 2):
        wait_loaded(page, f"#item-photos figure:nth-child({i}) img")
    expect(dialog.locator("#item-facts")).to_contain_text("price")
    page.screenshot(path=str(tmp_path / "item-dialog.png"))

    metadata = json.loads(dialog.get_by_label("Metadata (a JSON object)").input_value())
    assert metadata["price"] == 12
    metadata["price"] = 15
    metadata["size"]["w"] = 11  # a nested change must not lose the fields beside it
    dialog.get_by_label("Label").fill("moons")
    dialog.get_by_label("Metadata (a JSON object)").fill(json.dumps(metadata))
    dialog.get_by_role("button", name="Save the changes").click()
    expect(dialog.locator("#item-facts")).to_contain_text("moons")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    expect(first).to_have_attribute("data-label", "moons")
    expect(first.locator(".result-metadata")).to_contain_text("15")
    expect(first.locator(".result-metadata")).to_contain_text('{"h":20,"w":11}')  # stored with sorted keys
    expect(page.locator('#label-chips [data-label="moons"]')).to_have_count(1)


def test_deleting_an_item_removes_it_and_a_rollback_brings_it_back(pages: Pages) -> None:
    page = pages.open()
    search(page, "astronaut")
    first = page.locator("#grid li").first
    expect(first).to_have_attribute("data-name", "astronaut/astronaut-original.jpg")
    item_id = first.get_attribute("data-id")
    before = page.locator("#versions-body tr.current").get_attribute("data-version")
    segments = page.locator("#versions-body tr.current td").nth(3).inner_text()  # earlier tests' adds

    first.get_by_role("button", name="Details of astronaut/astronaut-original.jpg").click()
    page.get_by_role("button", name="Delete this item").click()
    page.get_by_role("button", name="Yes, delete it").click()
    expect(page.locator("#item-dialog")).to_be_hidden()
    expect(page.locator(f'#grid li[data-id="{item_id}"]')).to_have_count(0)
    expect(page.locator("#grid li").first).to_have_attribute("data-label", "astronaut")  # a variant
    expect(page.locator("#versions-body tr.current")).not_to_have_attribute("data-version", before)
    # The new version says what made it: a delete (a deletion bitmap; its segments unchanged).
    expect(page.locator("#versions-body tr.current td").nth(1)).to_have_text("delete")
    expect(page.locator("#versions-body tr.current td").nth(3)).to_have_text(segments)

    page.get_by_role("button", name=f"Roll back to {before}").click()
    expect(page.locator("#versions-body tr.current")).to_have_attribute("data-version", before)
    expect(page.locator("#grid li").first).to_have_attribute("data-id", item_id)
    expect(page.locator("#summary-facts")).to_contain_text(before)


def test_on_a_phone_the_page_fits_and_offers_the_camera(pages: Pages) -> None:
    page = pages.open(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    camera = page.get_by_role("button", name="Take a photo")
    expect(camera).to_be_visible()
    assert page.locator("#photo-camera").get_attribute("capture") == "environment"
    assert page.locator("#photo-camera").get_attribute("accept") == "image/*"
    with page.expect_file_chooser() as chooser:
        camera.click()
    chooser.value.set_files(photo_file("chelsea"))
    expect(page.locator("#grid li").first).to_have_attribute("data-name", "chelsea/chelsea-original.jpg")
    wait_loaded(page, "#grid li:first-child img")
    # Against the device's width: on a phone Chromium widens innerWidth to fit wider content.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scroll"
    box = page.locator("#grid li").first.bounding_box()
    assert box and box["width"] <= 390


def test_every_control_has_an_accessible_name_and_the_keyboard_reaches_it(pages: Pages) -> None:
    page = pages.open()
    search(page, "rocket")
    page.get_by_role("button", name="Add a metadata filter").click()
    expect(page.locator("#versions-body tr")).not_to_have_count(0)

    # Chromium's own accessibility tree: every control it exposes has a computed name.
    cdp = page.context.new_cdp_session(page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    controls = {"button", "textbox", "combobox", "spinbutton", "progressbar", "checkbox", "link", "listbox"}
    unnamed = [
        (node["role"]["value"], node.get("backendDOMNodeId"))
        for node in nodes
        if not node.get("ignored")
        and node.get("role", {}).get("value") in controls
        and not (node.get("name") or {}).get("value", "").strip()
    ]
    assert unnamed == []
    named = [n.get("name", {}).get("value") for n in nodes if n.get("role", {}).get("value") == "button"]
    assert {"Choose a photo", "Train", "Add", "Use"} <= set(named)

    # The photo chooser opens from the keyboard: Tab to its button, press Enter.
    page.locator("#endpoint").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "choose-photo":
            break
    assert page.evaluate("document.activeElement.id") == "choose-photo"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(photo_file("colorwheel"))
    expect(page.locator("#grid li").first).to_have_attribute(
        "data-name", "colorwheel/colorwheel-original.jpg"
    )
    # Escape closes the item dialog, and focus comes back to the page.
    page.locator("#grid li").first.get_by_role("button", name=re.compile("^Details of")).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#item-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#item-dialog")).to_be_hidden()
    assert page.evaluate("document.activeElement.getAttribute('aria-label') || ''").startswith("Details of")


def test_duplicates_show_as_rows_of_photos_and_a_group_is_deleted_but_its_keeper(pages: Pages) -> None:
    page = pages.open()
    before = page.locator("#versions-body tr.current").get_attribute("data-version")
    page.get_by_role("button", name="Find duplicates").click()
    expect(page.locator("#dup-status")).to_contain_text(f"in version {before}")
    groups = page.locator("#dup-groups > li")
    expect(groups.first).to_be_visible()
    assert groups.count() >= 2, "the demo photos' variants make several groups"
    first = groups.first
    wait_loaded(page, "#dup-groups > li:first-child .dup-item:nth-child(2) img")
    photos = first.locator(".dup-item")
    ids = [int(t.split("#")[1]) for t in photos.locator("label").all_inner_texts()]
    assert ids[0] == min(ids) and len(ids) >= 2
    expect(photos.nth(1)).to_contain_text("score ")

    # Keep the second one instead of the oldest; the others go in one batch delete, confirmed.
    photos.nth(1).get_by_role("radio").check()
    first.get_by_role("button", name="Delete all but the one kept").click()
    doomed = [i for i in ids if i != ids[1]]
    confirm = first.get_by_role("button", name=re.compile(r"^Yes, delete"))
    expect(confirm).to_contain_text(", ".join(f"#{i}" for i in doomed))
    confirm.click()
    expect(first.locator(".dup-result")).to_contain_text(f"Deleted {len(doomed)}")
    expect(page.locator("#versions-body tr.current")).not_to_have_attribute("data-version", before)
    expect(page.locator("#versions-body tr.current td").nth(1)).to_have_text("delete")

    # Another group: not duplicates, remembered by the service.
    second = groups.nth(1)
    marked = [int(t.split("#")[1]) for t in second.locator(".dup-item label").all_inner_texts()]
    second.get_by_role("button", name="Not duplicates").click()
    expect(second.locator(".dup-result")).to_contain_text("Marked as not duplicates")
    stored = requests.get(
        f"{pages.server.url}/food/duplicates/ignored", headers=auth(QUERY), timeout=10
    ).json()["ignored"]
    assert sorted(marked) in stored

    page.get_by_role("button", name=f"Roll back to {before}").click()  # as the other tests found it
    expect(page.locator("#versions-body tr.current")).to_have_attribute("data-version", before)
