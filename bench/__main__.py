"""Run every benchmark in one process, one after another, and write docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime

from service.config import ROOT

SECTIONS = ("quality", "perf", "reliability")


def main(names: list[str]) -> None:
    chosen = names or list(SECTIONS)
    parts = []
    for name in chosen:
        module = __import__(f"bench.{name}", fromlist=["run", "markdown"])
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = module.run()
        document = getattr(module, "DOCUMENT", None)
        if document:  # a report of its own (docs/RELIABILITY.md)
            (ROOT / "docs" / document).write_text(module.markdown(result) + "\n")
            print(f"wrote docs/{document}")
        else:
            parts.append(module.markdown(result))
        print(f"== {name} done in {time.perf_counter() - started:.0f}s", flush=True)
    import tensorflow as tf

    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}, no GPU. Every ratio below "
        "compares figures measured side by side in the same run.",
        "",
    ]
    if not parts:
        return
    target = ROOT / "docs" / "BENCHMARKS.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text("\n".join(header) + "\n" + "\n\n".join(parts) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
