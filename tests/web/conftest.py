"""The web front in a real browser: Debian's chromium driven by Playwright (never a browser of
Playwright's own download), against a real `tokenmill serve` of the default model with keys on,
started by the session on loopback.

Every page a test opens is watched: a console error or an uncaught page error fails the test at
teardown. `axe_violations(page)` runs axe-core (vendored by `make test` into tests/server/js,
evaluated in the page from disk, not fetched) and `screenshot(page, name)` saves a PNG under
$TOKENMILL_TEST_ARTIFACTS (default test-artifacts/ in the checkout, ignored by git).
Skipped with the reason where chromium, Playwright or axe-core is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))  # server_live

from server_live import MODEL_ID, start_server, stop_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# What the machine's probe found Debian's chromium needs headless as root on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
AXE = Path(__file__).parent.parent / "server" / "js" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(os.environ.get("TOKENMILL_TEST_ARTIFACTS",
                                Path(__file__).parent.parent.parent / "test-artifacts"))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
MAX_MODEL_LEN = 1024
# A catalog entry whose text is markup: the pages must show it as text, never run it.
HOSTILE_ID = "test/hostile-markup"
HOSTILE_SUMMARY = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
HOSTILE_CATALOG = f"""
models:
  - id: {HOSTILE_ID}
    name: "<b>Hostile</b> markup"
    summary: '{HOSTILE_SUMMARY}'
    card: |
      A card with <script>window.__pwned=3</script> raw HTML and a
      [link](javascript:window.__pwned=4) that must not be one.
    family: llama
    template: chatml
    context_length: 4096
    price: {{input: "1.5", output: "2"}}
    source: {{path: not-here.gguf}}
    hardware: none
"""


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


def axe_violations(page) -> list[dict]:
    """axe-core's WCAG 2 A/AA violations on the page as it is now: [{id, impact, nodes}]."""
    if not AXE.exists():
        pytest.skip(f"axe-core is not at {AXE}: `make test` vendors it with npm")
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {runOnly: {type: 'tag',
            values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
        return r.violations.map(v => ({id: v.id, impact: v.impact,
                                       nodes: v.nodes.map(n => n.target.join(' '))}));
    }""")
    return result


def screenshot(page, name: str) -> Path:
    """The whole page as ARTIFACTS/screenshots/<name>.png."""
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page, key: str) -> None:
    """Type the key into the page's API key field, as a user would (it lands in localStorage)."""
    page.get_by_label("API key").fill(key)


@pytest.fixture(scope="session")
def model_id() -> str:
    return MODEL_ID


def have_node_openai() -> bool:
    return bool(shutil.which("node")) and (
        AXE.parent.parent / "openai" / "package.json").exists()


def refused(status: int, reason: str) -> str:
    """The console error chromium logs for a response with this status."""
    return f"Failed to load resource: the server responded with a status of {status} ({reason})"
