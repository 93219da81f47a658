"""Run every benchmark in one process, one after another, and write docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime

from service.core.config import ROOT

SECTIONS = (
    "quality",
    "perf",
    "request_path",
    "filters",
    "lifecycle",
    "size",
    "fanout",
    "capacity",
    "duplicates",
    "reliability",
)


def main(names: list[str]) -> None:
    chosen = names or list(SECTIONS)
    (ROOT / "cache").mkdir(exist_ok=True)  # every section works under it; a fresh clone has none
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
    if names and target.exists():
        # Some sections only: replace them in the document (by their "## " title), keep the rest.
        parts = merge_sections(target.read_text(), parts)
        header[2] = header[2].replace(
            "Written by `make bench`", f"Written by `make bench` in parts; {', '.join(chosen)} last,"
        )
    target.write_text("\n".join(header) + "\n" + "\n\n".join(parts) + "\n")
    print(f"wrote {target}")


def merge_sections(document: str, fresh: list[str]) -> list[str]:
    """The document's "## " sections in order, those with a fresh version replaced, new ones added."""
    old = ["## " + s.strip() for s in document.split("\n## ")[1:]]
    title = lambda section: section.splitlines()[0]  # noqa: E731
    by_title = {title(s): s for s in fresh}
    merged = [by_title.pop(title(s), s) for s in old]
    return merged + list(by_title.values())


if __name__ == "__main__":
    main(sys.argv[1:])
