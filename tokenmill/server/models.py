"""The models one server serves: id -> engine, catalog entry (price, card), chat template.

Every served model has its own engine (its own step thread and KV cache); a request is routed by
its `model` field, and an id that is not served is a 404 naming the ids that are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.catalog.catalog import CatalogEntry
from tokenmill.catalog.templates import ChatTemplate
from tokenmill.server.errors import model_not_found
from tokenmill.server.protocol import ModelCard
from tokenmill.server.tool_formats import FORMATS, ToolFormat


@dataclass(eq=False)
class ServedModel:
    id: str  # what clients send in `model`
    engine: Any  # an AsyncLLM (or anything with its interface)
    entry: CatalogEntry  # price, context, family and card, from the catalog
    fingerprint: str = "tokenmill"  # system_fingerprint: changes when the model or code does
    # The checkpoint's own chat template, else the catalog's built-in; None: chat is refused.
    chat_template: ChatTemplate | None = field(init=False)
    _token_text: dict[int, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.chat_template = ChatTemplate.for_tokenizer(self.engine.tokenizer, self.entry.template)

    @property
    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls (the catalog's `tool_format`)."""
        return FORMATS[self.entry.tool_format]

    @property
    def renders_tools(self) -> bool:
        """Whether its chat template writes the tool list itself (else the server describes the
        tools in a system message); the generic format is always described by the server."""
        template = self.chat_template
        return self.entry.tool_format != "generic" and template is not None and \
            any("tools" in source for source in template.sources.values())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def token_text(self, token_id: int) -> str:
        """One token's text (special tokens included), decoded once per id."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def card(self, created: int) -> ModelCard:
        owner = self.id.split("/", 1)[0] if "/" in self.id else "tokenmill"
        return ModelCard(id=self.id, created=created, owned_by=owner,
                         context_length=self.max_model_len,
                         pricing=self.entry.price.per_million_usd())


class ServedModels:
    """The served models by id, in the order they were given (the first is listed first)."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("a server needs at least one model")
        self._by_id: dict[str, ServedModel] = {}
        self._by_alias: dict[str, ServedModel] = {}  # the catalog's other spellings of an id
        for model in models:
            if model.id in self._by_id:
                raise ValueError(f"model id {model.id!r} is served twice")
            self._by_id[model.id] = model
            self._by_alias.update((alias, model) for alias in model.entry.aliases)

    def get(self, model_id: str) -> ServedModel:
        """The model with this id or alias, or a 404 `model_not_found` naming the served ids."""
        model = self._by_id.get(model_id) or self._by_alias.get(model_id)
        if model is None:
            raise model_not_found(model_id, list(self._by_id))
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
