"""`make screenshot`: docs/page.png, the web page showing real results from the demo of `make run`.

The same two commands as `make run` (`python -m bench.demo`, then `python -m service serve`),
on a temporary store and port, then Debian's Chromium (Playwright) searches the `food` demo with a
photo that is not in it (a new crop of scikit-image's cat, turned slightly) and takes the picture.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import demo
from service.core.config import ROOT

CHROMIUM = "/usr/bin/chromium"
TARGET = ROOT / "docs" / "page.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_photo() -> bytes:
    cat = demo.photo("chelsea")
    w, h = cat.size
    return demo.jpeg(cat.crop((int(w * 0.1), 0, int(w * 0.85), int(h * 0.9))).rotate(8, expand=False))


def wait_ready(url: str, endpoint: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server stopped before it was ready")
        try:
            if requests.get(f"{url}/{endpoint}", timeout=30).json().get("status") == "ready":
                return
        except (requests.RequestException, ValueError):  # not listening yet, or still loading
            pass
        time.sleep(0.5)
    raise SystemExit(f"{endpoint} was not ready in {timeout:.0f}s")


def shoot(url: str, target: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{url}/?endpoint=food")
        expect(page.locator("#summary-facts")).to_contain_text("ready", timeout=30_000)
        page.locator("#photo-file").set_input_files(
            {"name": "my-cat.jpg", "mimeType": "image/jpeg", "buffer": query_photo()}
        )
        expect(page.locator("#grid li")).to_have_count(10, timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.mouse.move(0, 0)
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target))
        browser.close()


def main() -> None:
    if not Path(CHROMIUM).exists():
        raise SystemExit("make screenshot needs Debian's chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="simsvc-screenshot-") as tmp:
        port = free_port()
        env = {
            **os.environ,
            "STORAGE_URI": f"file://{tmp}/store",
            "CACHE_DIR": f"{tmp}/cache",
            "HOST": "127.0.0.1",
            "PORT": str(port),
        }
        subprocess.run([sys.executable, "-m", "bench.demo"], cwd=ROOT, env=env, check=True)
        server = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, "food", server)
            shoot(url, TARGET)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    print(f"wrote {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
