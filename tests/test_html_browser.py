"""The HTML report in a real headless Chromium: it loads without console errors and draws its plots.

Skipped when no Chromium is installed, except in CI (CI=true), where a missing browser fails.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kdeploy

from conftest import FIXTURES, make_profile

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PALETTE_FIRST = (0x4E, 0x79, 0xA7)  # first candidate's colour in kdeploy/report/html.py PALETTE
READY_GREEN = (0x2E, 0x7D, 0x32)


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    msg = f"no headless browser found (looked for {', '.join(BROWSERS)}); apt-get install -y chromium"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " — CI=true, so the browser test may not be skipped")
    pytest.skip(msg)


def open_in_browser(page: Path, tmp: Path) -> tuple[np.ndarray, list[str], str]:
    """Loads `page`, returns (screenshot pixels RGB, console lines, DOM after load)."""
    from PIL import Image

    exe = browser()
    shot = tmp / f"{page.stem}.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,2000"]
    res = subprocess.run([exe, *flags, f"--screenshot={shot}", "--enable-logging=stderr", "--v=0", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    # Chromium logs every console message (console.*, uncaught errors, CSP-blocked loads) as INFO:CONSOLE.
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    return pixels, console, dom.stdout


def share_of(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> float:
    return float(np.mean(np.all(np.abs(pixels - np.array(rgb)) <= tol, axis=-1)))


@pytest.fixture(scope="module")
def html_report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    profile = make_profile(tmp, "cpu-edge", precisions=["fp32", "dynamic", "int8"], threads=[1])
    report = kdeploy.optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz",
                              out=tmp / "out", formats=("json", "html"))
    assert report.ready
    return tmp / "out" / "report.html"


def test_html_report_loads_in_chromium_without_console_errors_and_draws_plots(html_report, tmp_path):
    pixels, console, dom = open_in_browser(html_report, tmp_path)
    assert console == [], console
    for plot in ("plot-latency", "plot-size", "plot-pareto", "plot-error"):
        assert f'id="{plot}"' in dom
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20, "the screenshot is not blank"
    assert share_of(pixels, READY_GREEN) > 0.005, "the green READY banner is painted"
    assert share_of(pixels, PALETTE_FIRST) > 0.0005, "plot bars in the first candidate's colour are painted"


def test_browser_check_catches_console_errors_and_blocked_loads(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                    "content=\"default-src 'none'\"></head><body><p>x</p><img src=\"https://example.com/a.png\">"
                    "</body></html>")
    _, console, _ = open_in_browser(page, tmp_path)
    assert any("Content Security Policy" in line for line in console), console
