"""What the browser tests share besides fixtures (tests/web/conftest.py): chromium's place and
flags, the viewports, the hostile catalog entry, and helpers to run axe-core, take screenshots,
sign in and name chromium's console line for a refused request. A module of its own, not
conftest.py, so that test modules import it by a name no other test directory uses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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


def have_node_openai() -> bool:
    return bool(shutil.which("node")) and (
        AXE.parent.parent / "openai" / "package.json").exists()


def refused(status: int, reason: str) -> str:
    """The console error chromium logs for a response with this status."""
    return f"Failed to load resource: the server responded with a status of {status} ({reason})"
