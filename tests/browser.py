"""Headless Chromium for page tests: Debian's ``chromium`` driven by Playwright (no browser download).

``chromium_page()`` yields a Playwright page and the console errors it collects. Where Chromium is missing, the
set-up installs Debian's package with apt when it can (root, apt reachable); otherwise the test is skipped with a
message that says how to get it. The launch flags keep Chromium off this machine's closed network."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
_INSTALL_TRIED: list[bool] = []


def chromium_path() -> str:
    """Path of a Chromium binary, installing Debian's package once per session where possible; else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not _INSTALL_TRIED and shutil.which("apt-get") and os.geteuid() == 0:
        _INSTALL_TRIED.append(True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, timeout=900, check=False)
            if cmd[1] == "install" and done.returncode == 0:
                break
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium is not installed and could not be installed here: install Debian's 'chromium' "
                "package (apt-get install chromium) to run the page tests")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900):
    """A fresh headless Chromium page; yields (page, console_errors)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    exe = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()
