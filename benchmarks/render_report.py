"""Render a run's report page (or a demo's) in a real headless browser and save a screenshot to look at.

    python benchmarks/render_report.py OUTPUT_DIR --out shot.png [--width 1280] [--height 4000]

OUTPUT_DIR is a run's output_dir (its report.html) or a demo's --out folder (its demo_report.html); an .html file
works too. It uses the system's Chromium (`apt-get install chromium`, or $CHROMIUM naming the binary) with no
network, and exits 0 with a message saying it was skipped where no browser is installed (as on CI). The page is
rebuilt from the folder first unless --as-is is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SKIPPED = 0  # exit status when no browser is installed: a skipped check, not a failure


def find_browser() -> str | None:
    """$CHROMIUM, else the first of BROWSERS on PATH, else None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"]) or os.environ["CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def page_of(target: Path, rebuild: bool) -> Path:
    if target.is_file():
        return target
    if (target / "demo_report.json").is_file():
        if rebuild:
            from finetune.demo.page import write_demo_page

            write_demo_page(target)
        return target / "demo_report.html"
    if rebuild:
        from finetune.report.page import write_report

        return write_report(target)
    return target / "report.html"


def screenshot(browser: str, page: Path, out: Path, width: int, height: int, timeout: float = 120) -> None:
    """Chromium --headless --screenshot of `page` at width x height CSS pixels; raises RuntimeError when no PNG
    comes out (the browser's own messages in the error)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", "--disable-extensions", "--disable-background-networking",
                   "--proxy-server=127.0.0.1:9",  # nothing may be fetched: a request would fail, visibly
                   f"--user-data-dir={profile}", f"--window-size={width},{height}", "--virtual-time-budget=3000",
                   f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if not out.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run's output_dir, a demo's --out folder, or an .html file")
    parser.add_argument("--out", required=True, help="PNG screenshot to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--as-is", action="store_true", help="do not rebuild the page first")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"skipped: no headless browser installed (looked for {', '.join(BROWSERS)} and $CHROMIUM); "
              "on Debian or Ubuntu: apt-get install chromium")
        return SKIPPED
    page = page_of(Path(args.target), rebuild=not args.as_is)
    if not page.is_file():
        print(f"error: {page} does not exist; give a run's output_dir or a demo's --out folder", file=sys.stderr)
        return 2
    screenshot(browser, page, Path(args.out), args.width, args.height)
    print(f"wrote {args.out} ({page} in {browser}, {args.width}x{args.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
