"""The usage dashboard in chromium against the real server: a new key's requests, totals, limits
and charts as the ledger recorded them, the admin's view of every key, what it says without a key
or with a wrong one, accessibility, and screenshots at desktop and phone widths."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest
from playwright.sync_api import expect

from browser_kit import DESKTOP, PHONE, axe_violations, refused, screenshot, sign_in

PROMPTS = ["Say hi.", "Count to three.", "Name a colour."]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def usd(page, amount: float) -> str:
    """`amount` as the pages show money (common.js's usd(), whose formats
    test_money_shows_cents_or_two_significant_digits checks)."""
    return page.evaluate("async (x) => (await import('/static/js/common.js')).usd(x)", amount)


def new_key(web_server, **limits) -> tuple[str, str]:
    """A new key with a unique name: (name, key)."""
    name = f"usage-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{web_server.base_url}/admin/keys", json={"name": name, **limits},
                   headers=auth(web_server.key), timeout=30)
    assert r.status_code == 200, r.text
    return name, r.json()["key"]


@pytest.fixture(scope="module")
def used_key(web_server, model_id):
    """A key with rpm 60 and a $1.50 budget that made len(PROMPTS) chat completions: (name, key,
    the responses in order)."""
    name, key = new_key(web_server, rpm=60, budget="1.5")
    responses = []
    for prompt in PROMPTS:
        r = httpx.post(web_server.v1 + "/chat/completions", headers=auth(key), timeout=120,
                       json={"model": model_id, "max_tokens": 5, "temperature": 0,
                             "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        responses.append(r.json())
    return name, key, responses


def loaded(page, text: str) -> None:
    """Wait for the dashboard to say it shows `text` (e.g. "the key NAME", "every key")."""
    expect(page.locator("#usage-status")).to_contain_text(f"Usage of {text} from")


def field(page, scope: str, name: str) -> str:
    return page.locator(f"{scope} [data-field='{name}']").inner_text()


def utc_days(count: int) -> list[str]:
    today = datetime.now(timezone.utc).date()
    return [str(today - timedelta(days=n)) for n in range(count - 1, -1, -1)]


def test_a_keys_page_shows_its_requests_totals_limits_and_charts(open_page, used_key, model_id):
    name, key, responses = used_key
    usage = [r["usage"] for r in responses]
    prompt, completion = (sum(u[f] for u in usage) for f in ("prompt_tokens", "completion_tokens"))
    cost = float(sum(Decimal(str(u["estimated_cost"])) for u in usage))
    page = open_page("/usage")
    sign_in(page, key)
    loaded(page, f"the key {name}")

    ids = page.locator("#recent-table td.col-id").all_inner_texts()
    assert ids == [r["id"] for r in reversed(responses)]  # newest first
    assert page.locator("#recent-table th.col-key").count() == 0  # one key: no key column
    assert page.locator("#recent-table td.col-status").all_inner_texts() == ["completed"] * 3
    assert [field(page, "#totals", f) for f in ("requests", "prompt_tokens", "completion_tokens",
                                                 "cost")] == ["3", f"{prompt:,}", f"{completion:,}",
                                                              usd(page, cost)]
    assert [field(page, "#key-card", f) for f in ("rpm", "tpm", "models", "expires", "budget",
                                                  "spend", "remaining")] == [
        "60", "none", "any", "never", "$1.50", usd(page, cost), usd(page, 1.5 - cost)]
    assert page.locator("#key-card code").inner_text().startswith("sk-tm-")
    assert page.get_by_label("Budget spent").get_attribute("max") == "1.5"
    expect(page.get_by_label("Scope", exact=True)).to_be_hidden()  # not an admin key

    model_row = page.locator("#models-table tbody tr")
    assert model_row.locator("th, td").all_inner_texts() == [
        model_id, "3", f"{prompt:,}", f"{completion:,}", usd(page, cost)]

    chart = page.locator("#spend-chart svg[role='img']")
    first, last = utc_days(30)[0], utc_days(30)[-1]
    assert chart.get_attribute("aria-label").startswith(
        f"Spend per day, {first} to {last} (UTC): Cost {usd(page, cost)} in total")
    days = chart.locator("g.day")
    assert [d.get_attribute("data-date") for d in days.all()] == utc_days(30)
    heights = [float(h) for h in days.locator("rect").evaluate_all(
        "rects => rects.map(r => r.getAttribute('height'))")]
    assert heights[-1] > 0 and heights[:-1] == [0] * 29  # today's bar only
    tokens = page.locator("#tokens-chart")
    assert tokens.locator("svg[role='img'] g.day").count() == 30
    assert tokens.locator(".legend li").all_inner_texts() == [
        "Prompt tokens (lower part of each bar)", "Completion tokens (upper part of each bar)"]
    tokens.get_by_text("Show the data").click()
    today = tokens.locator("tbody tr").last
    assert today.locator("th, td").all_inner_texts() == [
        utc_days(1)[0], f"{prompt:,}", f"{completion:,}", f"{prompt + completion:,}"]

    page.get_by_label("Period", exact=True).select_option(label="Last 7 days")
    expect(chart.locator("g.day")).to_have_count(7)
    assert field(page, "#totals", "requests") == "3"


def test_a_key_without_requests_says_so_and_refresh_shows_a_new_one(open_page, web_server,
                                                                     model_id):
    name, key = new_key(web_server)
    page = open_page("/usage")
    sign_in(page, key)
    loaded(page, f"the key {name}")
    expect(page.get_by_text("No requests in this period.")).to_be_visible()
    expect(page.get_by_text("No requests yet.")).to_be_visible()
    expect(page.locator("#charts")).to_be_hidden()
    assert field(page, "#totals", "requests") == "0"
    assert field(page, "#key-card", "budget") == "none"
    r = httpx.post(web_server.v1 + "/chat/completions", headers=auth(key), timeout=120,
                   json={"model": model_id, "max_tokens": 1, "temperature": 0,
                         "messages": [{"role": "user", "content": "Hi."}]})
    assert r.status_code == 200, r.text
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#recent-table td.col-id")).to_have_text([r.json()["id"]])
    assert field(page, "#totals", "requests") == "1"
    expect(page.get_by_text("No requests in this period.")).to_be_hidden()
    assert page.locator("#spend-chart g.day").count() == 30


def test_an_admin_key_switches_to_every_key(open_page, used_key, web_server):
    name, _, responses = used_key
    page = open_page("/usage")
    sign_in(page, web_server.key)
    loaded(page, "the key admin")
    page.get_by_label("Scope", exact=True).select_option(label="Every key")
    loaded(page, "every key")
    rows = page.locator("#keys-table tbody tr")
    names = rows.locator("th").all_inner_texts()
    assert {"admin (admin)", name} <= set(names)
    mine = rows.filter(has=page.locator(f"th:text-is('{name}')"))
    assert mine.locator("td.col-rpm, td.col-budget").all_inner_texts() == ["60", "$1.50"]
    recent = page.locator("#recent-table tbody tr")
    by_id = dict(zip(recent.locator("td.col-id").all_inner_texts(),
                     recent.locator("td.col-key").all_inner_texts(), strict=True))
    assert all(by_id[r["id"]] == name for r in responses)
    page.get_by_label("Scope", exact=True).select_option(label="My key")
    loaded(page, "the key admin")
    expect(page.locator("#keys-section")).to_be_hidden()
    assert page.locator("#recent-table th.col-key").count() == 0


def test_without_a_key_it_says_so_and_a_wrong_key_shows_the_servers_message(open_page,
                                                                            web_server):
    page = open_page("/usage", allowed=(refused(401, "Unauthorized"),))
    expect(page.locator("#usage-status")).to_contain_text("Enter an API key above")
    expect(page.locator("#usage")).to_be_hidden()
    wrong = "sk-tm-" + "x" * 40
    r = httpx.get(web_server.v1 + "/usage/summary", headers=auth(wrong), timeout=30)
    assert r.status_code == 401
    sign_in(page, wrong)
    expect(page.get_by_role("alert")).to_have_text(r.json()["error"]["message"])
    expect(page.locator("#usage")).to_be_hidden()


def test_the_page_passes_axe_and_fits_desktop_and_phone_widths(open_page, used_key, web_server):
    name, key, _ = used_key
    for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_page("/usage", viewport)
        sign_in(page, key)
        loaded(page, f"the key {name}")
        page.get_by_text("Show the data").first.click()
        assert axe_violations(page) == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, f"usage-{width}")
        sign_in(page, web_server.key)
        loaded(page, "the key admin")
        page.get_by_label("Scope", exact=True).select_option(label="Every key")
        loaded(page, "every key")
        assert axe_violations(page) == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
        screenshot(page, f"usage-every-key-{width}")


def test_money_shows_cents_or_two_significant_digits(open_page):
    page = open_page("/usage")
    amounts = [0, 0.01, 1.5, 12.5, 0.0000026, 0.00000088, 0.000000153, 1.5e-10]
    assert [usd(page, a) for a in amounts] == [
        "$0.00", "$0.01", "$1.50", "$12.50", "$0.0000026", "$0.00000088", "$0.00000015",
        "$1.5e-10"]
