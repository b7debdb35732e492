"""IncrementalDetokenizer on the default model's byte-level BPE tokenizer, one token at a time."""

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello, world! Ça va? Très bien, naïve café à Zürich.",
    "日本語のテキストです。中文也可以，한국어도.",
    "Emoji: 😀🎉 👨‍👩‍👧 family, 🦜 parrot, 🇫🇷 flag.",
    "  two  spaces,\ttabs\nand newlines\n\n- list item ",
    "mixed: 1+1=2 ✓ ∑ ≈ 3.14 — «quotes» “curly” 🙂",
]


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True, chunk=1):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detok.step(output_ids[i : i + chunk]) for i in range(0, len(output_ids), chunk)]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.output_text
    return deltas


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer):
    return default_tokenizer.encode(PROMPT, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_concatenate_to_decode_and_never_split_a_char(
    default_tokenizer, prompt_ids, text, chunk
):
    output_ids = default_tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(default_tokenizer, prompt_ids, output_ids, chunk=chunk)
    assert "".join(deltas) == default_tokenizer.decode(output_ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_emoji_split_across_tokens_is_held_until_complete(default_tokenizer, prompt_ids):
    output_ids = default_tokenizer.encode("ok 🦜!", add_special_tokens=False)
    pieces = [default_tokenizer.decode([t]) for t in output_ids]
    assert pieces[0] == "ok" and pieces[-1] == "!"
    assert len(output_ids) >= 4  # the emoji is split over >= 2 tokens
    assert all("\ufffd" in p for p in pieces[1:-1])
    deltas = stream(default_tokenizer, prompt_ids, output_ids)
    assert deltas == ["ok"] + [""] * (len(output_ids) - 3) + [" 🦜", "!", ""]


def test_spaces_between_words_are_exact(default_tokenizer, prompt_ids):
    output_ids = default_tokenizer.encode("Hi , there . ok", add_special_tokens=False)
    deltas = stream(default_tokenizer, prompt_ids, output_ids)
    assert deltas == ["Hi", " ,", " there", " .", " ok", ""]


@pytest.mark.parametrize("text", [" Leading space", "No leading space", "\nnewline first"])
def test_first_token_after_the_prompt(default_tokenizer, prompt_ids, text):
    output_ids = default_tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(default_tokenizer, prompt_ids, output_ids)
    assert deltas[0] == default_tokenizer.decode(output_ids[:1])
    assert deltas[0][0] == text[0]
    assert "".join(deltas) == text


def test_empty_prompt(default_tokenizer):
    output_ids = default_tokenizer.encode("héllo 😀 wörld", add_special_tokens=False)
    assert "".join(stream(default_tokenizer, [], output_ids)) == "héllo 😀 wörld"


def test_special_tokens_are_skipped_or_kept(default_tokenizer, prompt_ids):
    tok = default_tokenizer
    text = "Sure.<|im_end|>\n<|im_start|>user\nthanks<|endoftext|>"
    output_ids = tok.encode(text, add_special_tokens=False)
    skipped = stream(tok, prompt_ids, output_ids, skip_special_tokens=True)
    assert "".join(skipped) == tok.decode(output_ids, skip_special_tokens=True)
    assert "".join(skipped) == "Sure.\nuser\nthanks"
    kept = stream(tok, prompt_ids, output_ids, skip_special_tokens=False)
    assert "".join(kept) == tok.decode(output_ids, skip_special_tokens=False)
    assert "<|im_end|>" in "".join(kept)


def test_flush_releases_an_unfinished_char_at_the_end(default_tokenizer, prompt_ids):
    emoji_ids = default_tokenizer.encode("🦜", add_special_tokens=False)
    output_ids = default_tokenizer.encode("a", add_special_tokens=False) + emoji_ids[:1]
    detok = IncrementalDetokenizer(default_tokenizer, prompt_ids)
    assert [detok.step([t]) for t in output_ids] == ["a", ""]
    assert detok.flush() == default_tokenizer.decode(output_ids)[1:]
    assert detok.output_text == default_tokenizer.decode(output_ids)
    assert detok.flush() == ""
