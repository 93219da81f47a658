"""Build the Elastic Beanstalk source bundle: exactly the committed files, via `git archive`.

Ignored and untracked files (.venv, models, data, cache) can never sneak in, and paths marked
`export-ignore` in .gitattributes (tests, benchmarks, CI) stay out.

    python infra/bundle.py [--ref HEAD] [--out dist/simsvc-<commit>.zip]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path | None = None, ref: str = "HEAD") -> Path:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    out = out or ROOT / "dist" / f"simsvc-{commit}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "archive", "--format=zip", f"--output={out}", ref], cwd=ROOT, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to bundle (default: HEAD)")
    parser.add_argument("--out", type=Path, help="the zip to write")
    args = parser.parse_args()
    print(build(args.out, args.ref))


if __name__ == "__main__":
    sys.exit(main())
