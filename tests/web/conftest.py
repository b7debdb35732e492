"""The web front in a real browser: Debian's chromium driven by Playwright (never a browser of
Playwright's own download), against a real `tokenmill serve` of the default model with keys on,
started by the session on loopback.

Every page a test opens is watched: a console error or an uncaught page error fails the test at
teardown. browser_kit.py has the rest: `axe_violations(page)` runs axe-core (vendored by `make
test` into tests/server/js, evaluated in the page from disk, not fetched) and `screenshot(page,
name)` saves a PNG under $TOKENMILL_TEST_ARTIFACTS (default test-artifacts/ in the checkout,
ignored by git). Skipped with the reason where chromium, Playwright or axe-core is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))  # server_live

from browser_kit import CHROMIUM, CHROMIUM_ARGS, DESKTOP, HOSTILE_CATALOG, MAX_MODEL_LEN  # noqa: E402
from server_live import MODEL_ID, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def web_server(default_model_path, tmp_path_factory):
    """`tokenmill serve` of the default model with keys on (the admin key in .key) and a catalog
    override adding HOSTILE_ID."""
    home = tmp_path_factory.mktemp("web_home")
    catalog = home / "extra-catalog.yaml"
    catalog.write_text(HOSTILE_CATALOG)
    running = start_server(home, ["--model", str(default_model_path), "--max-model-len",
                                  str(MAX_MODEL_LEN), "--kv-cache-gib", "0.25", "--catalog",
                                  str(catalog), "--drain-timeout", "10"])
    yield running
    stop_server(running)


# Per module, not per session: Playwright's sync API keeps an event loop running on this thread
# while it is started, and pytest-asyncio cannot run the async tests of later modules under it.
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium with "
                    "apt-get where it can (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class WatchedPage:
    """A page and the console errors and uncaught errors it logged, but for the console errors
    that are exactly one of `allowed` (chromium logs every 4xx response as one)."""

    def __init__(self, page, allowed: tuple[str, ...]):
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and m.text not in allowed and
                self.errors.append(f"console: {m.text} ({m.location.get('url')})"))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


@pytest.fixture
def open_page(browser, web_server):
    """open_page(path, viewport=DESKTOP, allowed=()): a new context (clean localStorage,
    clipboard allowed) at web_server's `path`; fails the test at teardown if any page logged an
    error other than the console messages in `allowed`."""
    contexts, watched = [], []

    def open_(path: str, viewport: dict = DESKTOP, allowed: tuple[str, ...] = ()):
        context = browser.new_context(viewport=viewport, base_url=web_server.base_url)
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        contexts.append(context)
        page = context.new_page()
        watched.append(WatchedPage(page, allowed))
        page.goto(path)
        return page

    yield open_
    for context in contexts:
        context.close()
    errors = [error for w in watched for error in w.errors]
    assert errors == [], "the pages logged errors"


@pytest.fixture(scope="session")
def model_id() -> str:
    return MODEL_ID


