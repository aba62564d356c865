"""Headless Chromium on a page of the local stack: a PNG of what a person sees, and the DOM the page rendered.

Why: whether a report is readable is decided by the UI that renders it (Prefect's UIs sanitise markdown, and the
classic and v2 UIs do it differently — tollwatch/prefect/quality_report.py), so the report is checked in a real
browser, not by reading the markdown. The Prefect UI is a single-page app that fetches the artifact after load:
`--virtual-time-budget` lets its requests and rendering finish before the capture.

`python -m tollwatch_dev.screenshot URL OUT.png [--dom OUT.html]`; Debian's `chromium` package (or
TOLLWATCH_CHROMIUM naming another binary).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Milliseconds of virtual time the page gets to fetch and render (the Prefect UI needs ~1-3 s on a busy machine).
VIRTUAL_TIME_MS = 15_000
#: Wall-clock limit of one Chromium run.
TIMEOUT_S = 120.0

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")


class ChromiumError(RuntimeError):
    """Chromium is missing, or did not produce what was asked."""


def chromium() -> str:
    """The Chromium binary: $TOLLWATCH_CHROMIUM, else `chromium` or `chromium-browser` on PATH."""
    named = os.environ.get("TOLLWATCH_CHROMIUM")
    for candidate in [named] if named else ["chromium", "chromium-browser"]:
        found = shutil.which(candidate)
        if found:
            return found
    raise ChromiumError(
        f"no Chromium found ({named or 'chromium, chromium-browser'} not on PATH): install Debian's `chromium` "
        "package (apt-get install chromium) or set TOLLWATCH_CHROMIUM to a Chromium binary"
    )


def _run(args: list[str], *, width: int, height: int, budget_ms: int) -> subprocess.CompletedProcess[str]:
    argv = [chromium(), *_FLAGS, f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ChromiumError(f"chromium did not finish within {TIMEOUT_S:g} s: {' '.join(argv)}") from exc


def screenshot(url: str, out: Path, *, width: int = 1400, height: int = 1800, budget_ms: int = VIRTUAL_TIME_MS) -> Path:
    """A PNG of `url` as a `width` x `height` window shows it; returns `out`. Raises ChromiumError if Chromium is
    missing or wrote no image."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    done = _run([f"--screenshot={out}", url], width=width, height=height, budget_ms=budget_ms)
    if not out.exists() or out.stat().st_size == 0:
        raise ChromiumError(f"chromium wrote no screenshot of {url} (exit {done.returncode}): {_tail(done.stderr)}")
    return out


def dump_dom(url: str, *, width: int = 1400, height: int = 1800, budget_ms: int = VIRTUAL_TIME_MS) -> str:
    """The page's DOM after its scripts ran (`--dump-dom`): what the UI actually put on the page."""
    done = _run(["--dump-dom", url], width=width, height=height, budget_ms=budget_ms)
    if done.returncode != 0 or not done.stdout.strip():
        raise ChromiumError(f"chromium dumped no DOM of {url} (exit {done.returncode}): {_tail(done.stderr)}")
    return done.stdout


def _tail(stderr: str, lines: int = 5) -> str:
    # Chromium logs D-Bus noise on a headless machine; the last lines say what went wrong, if anything.
    return " | ".join(stderr.strip().splitlines()[-lines:]) or "no output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.screenshot", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--dom", type=Path, help="also write the rendered DOM here")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.url, args.out, width=args.width, height=args.height))
        if args.dom:
            args.dom.write_text(dump_dom(args.url, width=args.width, height=args.height))
            print(args.dom)
    except ChromiumError as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
