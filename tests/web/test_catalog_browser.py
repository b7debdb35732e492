"""The catalog and the model pages in chromium: what they list and link, search and filters, the
examples they show (each run as shown against the server), text that is markup shown as text,
accessibility, no console errors, and screenshots at desktop and phone widths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from browser_kit import (DESKTOP, HOSTILE_ID, HOSTILE_SUMMARY, PHONE, axe_violations,
                      have_node_openai, screenshot)

JS_DIR = Path(__file__).parent.parent / "server" / "js"  # its node_modules has `openai`


def test_the_catalog_lists_the_served_model_first_with_its_context_and_prices(open_page,
                                                                            model_id):
    page = open_page("/")
    first = page.locator(".model-entry").first
    assert first.locator("h2").inner_text() == "SmolLM2 135M Instruct"
    assert first.locator(".badge").inner_text() == "Served"
    assert first.locator(".context").inner_text() == "1,024 tokens"  # the served context
    assert first.locator(".price-input").inner_text() == "$0.02 / 1M tokens"
    assert first.locator(".price-output").inner_text() == "$0.04 / 1M tokens"
    first.get_by_role("link", name="SmolLM2 135M Instruct").click()
    page.wait_for_url(f"**/models/{model_id}")
    assert page.locator("h1").inner_text() == "SmolLM2 135M Instruct"


def test_search_and_the_family_and_status_filters_narrow_the_list(open_page):
    page = open_page("/")

    def shown() -> list[str]:
        return page.locator(".model-entry:visible h2").all_inner_texts()

    assert len(shown()) == 8  # the shipped catalog's 7 and the test's hostile entry
    page.get_by_label("Search").fill("qwen")
    assert shown() == ["Qwen2 72B Instruct"]
    page.get_by_label("Search").fill("")
    page.get_by_label("Family").select_option("mistral")
    assert shown() == ["Mistral 7B Instruct v0.3", "WizardLM-2 7B", "OpenHermes 2.5 Mistral 7B"]
    page.get_by_label("Family").select_option("")
    page.get_by_label("Status").select_option("served")
    assert shown() == ["SmolLM2 135M Instruct"]
    assert page.locator("#catalog-count").inner_text() == "1 of 8 models"
    page.get_by_label("Search").fill("no such model anywhere")
    assert shown() == [] and page.get_by_text("No model matches.").is_visible()


def test_markup_in_a_catalog_entry_shows_as_text_and_never_runs(open_page):
    page = open_page("/")
    entry = page.locator(".model-entry", has=page.locator(f"code:text-is('{HOSTILE_ID}')"))
    assert entry.locator(".summary").inner_text() == HOSTILE_SUMMARY
    assert entry.locator("h2").inner_text() == "<b>Hostile</b> markup"
    entry.locator("h2 a").click()
    page.wait_for_url(f"**/models/{HOSTILE_ID}")
    card = page.locator(".card-text")
    assert "<script>window.__pwned=3</script>" in card.inner_text()
    assert card.locator("a").count() == 0  # the javascript: link is not a link
    assert page.evaluate("() => window.__pwned") is None


def example(page, language: str, kind: str) -> str:
    page.get_by_text({"curl": "cURL", "python": "Python", "javascript": "JavaScript"}[language],
                     exact=True).click()
    code = page.locator(f"#snippet-{language}-{kind}")
    assert code.is_visible()
    return code.inner_text()


def test_the_model_page_shows_the_three_examples_for_this_servers_base_url(open_page,
                                                                          web_server, model_id):
    page = open_page(f"/models/{model_id}")
    assert page.locator("#base-url").inner_text() == web_server.v1
    for language in ("curl", "python", "javascript"):
        texts = [example(page, language, kind) for kind in ("plain", "stream", "json")]
        assert page.locator(".snippet:visible").count() == 3
        for text in texts:
            assert web_server.v1 in text and f'"{model_id}"' in text
            assert web_server.key not in text  # the examples read the key from the environment
        assert ("stream" not in texts[0]) and ("json_object" in texts[2])
    page.locator(".snippet:visible button.copy").first.click()  # the JavaScript plain example
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == example(page, "javascript", "plain")


def run_example(command: list[str], code: str, cwd: Path, suffix: str, key: str) -> str:
    """`code` saved as a file in `cwd` and run by `command`, with the key in the environment
    the example reads it from; its stdout."""
    path = cwd / f"model-page-example-{uuid.uuid4().hex[:8]}{suffix}"
    path.write_text(code)
    try:
        done = subprocess.run([*command, str(path)], cwd=cwd, capture_output=True, text=True,
                              timeout=240, env=dict(os.environ, TOKENMILL_API_KEY=key))
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_python_example_run_as_shown_gets_an_answer_and_json_mode_gives_json(
        open_page, web_server, model_id, tmp_path):
    page = open_page(f"/models/{model_id}")
    answer = run_example([sys.executable], example(page, "python", "plain"), tmp_path, ".py",
                         web_server.key)
    assert answer.strip()
    reply = run_example([sys.executable], example(page, "python", "json"), tmp_path, ".py",
                        web_server.key)
    assert isinstance(json.loads(reply), dict)


def test_the_curl_and_javascript_examples_run_as_shown_get_answers(open_page, web_server,
                                                                   model_id, tmp_path):
    page = open_page(f"/models/{model_id}")
    body = json.loads(run_example(["bash"], example(page, "curl", "plain"), tmp_path, ".sh",
                                  web_server.key))
    assert body["object"] == "chat.completion" and body["model"] == model_id
    if not have_node_openai():
        pytest.skip("node or the vendored openai npm package is missing (make test vendors it)")
    streamed = run_example(["node"], example(page, "javascript", "stream"), JS_DIR, ".mjs",
                           web_server.key)
    assert streamed.strip()


@pytest.mark.parametrize("path", ["/", "/models/SmolLM2-135M-Instruct"])
def test_the_pages_pass_axe_and_fit_desktop_and_phone_widths(open_page, path):
    name = "catalog" if path == "/" else "model"
    for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_page(path, viewport)
        assert axe_violations(page) == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, f"{name}-{width}")
