"""The pages as HTTP responses, against a scripted engine (no model, no browser): what the catalog
lists and in which order, how it says to serve the rest, text that is markup escaped on every
page, the security headers, and assets that reference nothing outside this server. The browser
tests (test_*_browser.py) run the same pages in chromium against the real server."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from server_fakes import FakeEngine
from tokenmill.catalog.catalog import Catalog, CatalogEntry, ModelSource
from tokenmill.catalog.pricing import Price
from tokenmill.server.app import build_app
from tokenmill.server.models import ServedModel, ServedModels
from tokenmill.server.state import ServerSettings
from tokenmill.web import mount_web
from tokenmill.web.catalog_view import model_views, usd_per_million
from tokenmill.web.pages import CSP

WEB = Path(__file__).parent.parent.parent / "tokenmill" / "web"
MARKUP = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


def entry(model_id: str, source: ModelSource, *, summary: str = "One line.", card: str = "Card.",
          family: str = "llama", aliases: tuple[str, ...] = ()) -> CatalogEntry:
    return CatalogEntry(id=model_id, name=f"Name of {model_id}", summary=summary, card=card,
                        family=family, template=None, context_length=4096,
                        price=Price(input=390_000, output=1_500_000), source=source,
                        hardware="a CPU", aliases=aliases)


SERVED = entry("org/served", ModelSource(path="/nonexistent"), summary=MARKUP,
               card=f"# Title\n\n{MARKUP}\n\n[click](javascript:alert(3))", aliases=("served",))
ON_HUB = entry("org/on-hub", ModelSource(repo="org/on-hub"), family="qwen2")
ON_PYPI = entry("org/on-pypi", ModelSource(pypi="pkg==1", member="pkg/m.gguf"),
                family="mistral")
CATALOG = Catalog([ON_HUB, SERVED, ON_PYPI])


@pytest.fixture
def models():
    return ServedModels([ServedModel(id=SERVED.id, engine=FakeEngine(max_model_len=256),
                                     entry=SERVED)])


@pytest.fixture
async def client(models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))  # nothing pulled: the Hub entry is absent
    app = build_app(list(models), ServerSettings(keys=None))
    mount_web(app, CATALOG)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        yield c


def test_served_models_come_first_then_the_catalog_with_the_commands_that_serve_it(
        models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    views = model_views(CATALOG, models)
    assert [(v.id, v.served, v.context_length) for v in views] == [
        ("org/served", True, 256), ("org/on-hub", False, 4096), ("org/on-pypi", False, 4096)]
    assert [v.how_to_serve for v in views] == [
        (), ("tokenmill pull org/on-hub", "tokenmill serve --model org/on-hub"),
        ("tokenmill serve --model org/on-pypi",)]  # a PyPI source is fetched on first use
    assert (views[0].input_price, views[0].output_price) == ("0.39", "1.50")


def test_prices_show_cents_and_any_finer_digits():
    assert [usd_per_million(m) for m in (0, 20_000, 390_000, 1_500_000, 65, 123_456_789)] == [
        "0.00", "0.02", "0.39", "1.50", "0.000065", "123.456789"]


async def test_markup_in_catalog_text_is_shown_as_text_on_every_page(client):
    for path in ("/", "/models/org/served", "/models/served"):
        html = (await client.get(path)).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&lt;script&gt;alert(2)" in html, path
    card = (await client.get("/models/org/served")).text
    assert "<h1>Title</h1>" in card  # markdown is rendered ...
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in card  # ... but raw HTML in it is text
    assert 'href="javascript:' not in card  # and a javascript: link is not made a link


async def test_the_catalog_page_marks_what_is_served_and_links_every_model(client):
    html = (await client.get("/")).text
    links = re.findall(r'<h2><a href="(/models/[^"]+)">', html)
    assert links == ["/models/org/served", "/models/org/on-hub", "/models/org/on-pypi"]
    assert re.findall(r'data-served="([a-z-]+)"', html) == ["served", "not-served", "not-served"]
    assert "<code>tokenmill pull org/on-hub</code>, then <code>tokenmill serve --model " \
           "org/on-hub</code>" in html
    family_filter = html[html.index('id="family-filter"'):html.index("</select>")]
    assert re.findall(r'<option value="(\w+)">', family_filter) == ["llama", "mistral", "qwen2"]


async def test_a_catalog_entry_not_served_has_a_page_that_says_how_to_serve_it(client):
    html = (await client.get("/models/org/on-pypi")).text
    assert "This server does not serve it." in html
    assert "<code>tokenmill serve --model org/on-pypi</code>" in html
    assert "Try it in the playground" not in html


async def test_an_unknown_model_is_a_404_page(client):
    r = await client.get("/models/no/such-model")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "No model &#39;no/such-model&#39; is served or in the catalog." in r.text


async def test_every_page_has_a_strict_csp_and_every_response_nosniff_and_no_referrer(client):
    for path in ("/", "/models/org/served", "/models/none", "/playground", "/usage"):
        r = await client.get(path)
        assert r.headers["content-security-policy"] == CSP, path
        assert r.headers["cache-control"] == "no-store", path
    for path in ("/", "/static/js/common.js", "/v1/models", "/health", "/nowhere"):
        r = await client.get(path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer", path
    assert "script-src 'self';" in CSP and "'unsafe-inline'" not in CSP


async def test_the_assets_are_served_with_their_types(client):
    for path, kind in (("/static/js/common.js", "text/javascript"),
                       ("/static/css/tokenmill.css", "text/css"),
                       ("/static/favicon.svg", "image/svg+xml")):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    assert (await client.get("/static/js/missing.js")).status_code == 404


def test_the_pages_and_assets_load_nothing_from_elsewhere_and_run_no_inline_code():
    files = [p for p in WEB.rglob("*") if p.suffix in (".html", ".js", ".css", ".svg")]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        # The one absolute URL allowed is SVG's namespace name, which nothing fetches.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        if path.suffix == ".html":
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), path.name  # no inline script
            assert not re.search(r"\sstyle=|<style", text), path.name  # no inline style
            assert not re.search(r"\son[a-z]+=", text), path.name  # no inline handlers
        if path.suffix == ".js":
            assert "innerHTML" not in text and "eval(" not in text, path.name
