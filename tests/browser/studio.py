"""A real ``nijimi serve`` and a headless system Chromium driven by Playwright, for the browser tests and
``docs/screenshots.py``.

Playwright's own browser download needs the network, so the browser is the system's Chromium (Debian's
``chromium`` package): ``$NIJIMI_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on the PATH, else
``/usr/bin/chromium``. ``make test`` installs it with apt-get when it is missing and it can (as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 820}
DEBIAN_CHROMIUM = "/usr/bin/chromium"


def find_chromium() -> str | None:
    """The Chromium binary to drive, or None."""
    for candidate in (os.environ.get("NIJIMI_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      DEBIAN_CHROMIUM):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_browser() -> str | None:
    """Why the browser tests cannot run (one line), or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python Playwright is not installed: pip install -e '.[test]' (make test does)"
    if find_chromium() is None:
        return ("Chromium not found (looked at $NIJIMI_CHROMIUM, chromium and chromium-browser on the PATH, "
                "/usr/bin/chromium): apt-get install chromium (make test does as root), or set NIJIMI_CHROMIUM")
    return None


def start_server(output: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``nijimi serve`` with the embedded model on a free port of 127.0.0.1, saving into ``output`` (``options``:
    more of its flags); returns the process and its URL once it answers (the first stderr line says where it
    listens, after the model loaded)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NIJIMI_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "nijimi", "serve", "--port", "0", "--quiet", "--output-dir",
                                str(output), *options], stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = process.stderr.readline()
    found = re.match(r"nijimi serve: (http://127\.0\.0\.1:\d+)/ ", line)
    if not found:
        process.kill()
        raise RuntimeError(f"nijimi serve did not start: {line}{process.stderr.read()}")
    return process, found.group(1)


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl+C, as a user stops it; killed when it does not end within a minute."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    finally:
        process.kill()
        process.stderr.close()


def launch(playwright, user_data_dir: Path):
    """A persistent browser context of the system Chromium in a fresh profile folder."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT)


def open_page(context, url: str):
    """A new tab on the page, once it has loaded its lists (``body[data-ready]``)."""
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return page
