"""Start the Procfile's web command (what Elastic Beanstalk runs) on a free port, for tests."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from service.core.config import ROOT

from .conftest import free_port


def procfile_web_command(app_dir: Path = ROOT) -> list[str]:
    for line in (app_dir / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return shlex.split(line[len("web:") :])
    raise AssertionError("Procfile has no web: line")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def workers(self) -> set[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def versions_by_worker(self, endpoint: str, until: str, timeout: float = 60) -> dict[int, str]:
        """Ask /health until every worker has answered with version `until` (or time runs out)."""
        seen: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline:
                answers = pool.map(lambda _: requests.get(f"{self.url}/health", timeout=10).json(), range(8))
                for body in answers:
                    seen[body["worker"]] = body["endpoints"][endpoint]
                if set(seen) >= self.workers() and all(v == until for v in seen.values()):
                    break
                time.sleep(0.1)
        return seen


@contextmanager
def procfile_server(tmp: Path, env: dict[str, str], app_dir: Path = ROOT) -> Iterator[Server]:
    """Run the Procfile's web command from `app_dir` with the venv's gunicorn; stop it afterwards."""
    port = free_port()
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the venv's gunicorn
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "STORAGE_URI": f"file://{tmp / 'store'}",
        "CACHE_DIR": str(tmp / "cache"),
        **env,
    }
    full_env.pop("PYTHONPATH", None)  # import the service from app_dir, nothing else
    log = tmp / "gunicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            procfile_web_command(app_dir), cwd=app_dir, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
