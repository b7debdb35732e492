"""The web front's routes: `/` the catalog, `/models/{id}` a model page, `/playground`, `/usage`,
rendered by Jinja2 with autoescaping (catalog and card text are data, never markup), and their
assets under `/static/`. The pages call the API from the browser, same origin, with the key the
user typed (kept in localStorage); they load nothing from anywhere else, and every page carries a
Content-Security-Policy that allows scripts, styles and requests to this origin only."""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from markdown_it import MarkdownIt

from tokenmill.catalog.catalog import Catalog
from tokenmill.server.models import ServedModels
from tokenmill.server.state import ServerSettings
from tokenmill.web.catalog_view import find_view, model_views
from tokenmill.web.controls import controls

HERE = Path(__file__).parent
# No inline script or style anywhere; connections to this origin only; not framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}

# Model cards are markdown from catalog files: raw HTML in them is shown as text, and links with
# schemes such as javascript: are not made links (markdown-it's validateLink).
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined)


def mount_web(app: FastAPI, catalog: Catalog) -> None:
    """Add the pages and /static/ to `app` (from build_app: its models and settings are read
    from app.state)."""
    models: ServedModels = app.state.models
    settings: ServerSettings = app.state.server_state.settings
    auth_required = settings.keys is not None
    max_context = max(model.max_model_len for model in models)

    def page(template: str, request: Request, status: int = 200, **context) -> HTMLResponse:
        html = _templates.get_template(template).render(
            auth_required=auth_required, path=request.url.path, **context)
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def catalog_page(request: Request):
        views = model_views(catalog, models)
        families = sorted({view.entry.family for view in views})
        return page("catalog.html", request, views=views, families=families)

    @router.get("/models/{model_id:path}")
    async def model_page(model_id: str, request: Request):
        view = find_view(catalog, models, model_id)
        if view is None:
            return page("not_found.html", request, 404, what=f"No model {model_id!r} is served "
                        "or in the catalog.")
        return page("model.html", request, view=view, card=_markdown.render(view.entry.card))

    @router.get("/playground")
    async def playground_page(request: Request):
        return page("playground.html", request, models=list(models),
                    controls=controls(settings.default_max_tokens, max_context))

    @router.get("/usage")
    async def usage_page(request: Request):
        return page("usage.html", request)

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
