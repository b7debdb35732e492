"""The catalog and the model pages in chromium: what they list and link, the examples they show
(the Python one run as shown), text that is markup shown as text, accessibility, no console
errors, and screenshots at desktop and phone widths."""

from __future__ import annotations

from conftest import (DESKTOP, HOSTILE_ID, HOSTILE_SUMMARY, PHONE, axe_violations,
                      screenshot)


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
    assert axe_violations(page) == []


def test_the_catalog_pages_pass_axe_at_desktop_and_phone_widths(open_page):
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_page("/", viewport)
        assert axe_violations(page) == []
        screenshot(page, f"catalog-{name}")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
