"""The requests of a benchmark: chat requests with a given number of prompt tokens (counted by a
tokenizer of the model, so that every server gets the same text) and a given number of output
tokens (sent as max_tokens with ignore_eos, so every server makes exactly that many).

Datasets: `random` (text of random tokens, as `vllm bench serve --dataset-name random`),
`shared-prefix` (one long system prompt of random tokens shared by every request, then a random
question: what a prefix cache saves), `long-prompt` (random, but every k-th prompt is long: what
a long prefill does to the inter-token latency of the streams running beside it; chunked
prefill bounds it) and `chat` (short natural questions, cycled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHAT_PROMPTS = (
    "Explain how rain forms, step by step.",
    "Write a short story about a lighthouse keeper and a storm.",
    "What are the main differences between TCP and UDP?",
    "List ten uses of a paperclip.",
    "Describe the city of Lisbon to someone who has never been there.",
    "How does a refrigerator keep food cold?",
    "Summarize the plot of a heist film you would like to watch.",
    "Give me a week of simple vegetarian dinner ideas.",
    "Why is the sky blue during the day and red at sunset?",
    "Explain recursion to a ten-year-old.",
    "Write a polite email declining a meeting invitation.",
    "What should I pack for a three-day hiking trip?",
    "Compare Python lists and tuples, with examples.",
    "How do vaccines train the immune system?",
    "Write a haiku sequence about autumn in a city.",
    "What are good habits for keeping a codebase maintainable?",
)


@dataclass(frozen=True)
class BenchRequest:
    messages: tuple[dict, ...]  # the chat messages sent
    input_len: int  # their content's tokens, by the bench tokenizer (the template adds more)
    output_len: int  # max_tokens, with ignore_eos: the tokens every server must make


def load_tokenizer(spec: str | None):
    """A tokenizer from a GGUF file or a Hugging Face checkpoint directory (None: the default
    model's, fetched like `tokenmill serve` does)."""
    from tokenmill.models.gguf_loader import load_gguf_config_and_tokenizer
    from tokenmill.models.hf_loader import load_hf_config_and_tokenizer

    if spec is None:
        from tokenmill.models.default import default_model_path
        path = default_model_path()
    else:
        path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_config_and_tokenizer(path)[1]
    if path.is_dir():
        return load_hf_config_and_tokenizer(path)[1]
    raise FileNotFoundError(f"tokenizer {spec!r} is neither a .gguf file nor a checkpoint "
                            "directory")


class TextSource:
    """Text of exactly n tokens (re-encoding it gives n tokens back) from random ordinary
    tokens: ids whose text is printable ASCII, so that no token is special or splits a
    character, and each server's tokenizer of the same model reads the same count."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        special = set(tokenizer.all_special_ids)
        self.ids = np.array([i for i in range(len(tokenizer)) if i not in special and _plain(
            tokenizer.decode([i]))], dtype=np.int64)
        if len(self.ids) < 100:
            raise ValueError("the tokenizer has too few plain-text tokens to make prompts from")

    def text(self, n: int) -> str:
        """Text that encodes to n tokens (n >= 1)."""
        ids = self.rng.choice(self.ids, size=n).tolist()
        for _ in range(10):  # decoding and re-encoding may merge or split a few tokens
            text = self.tokenizer.decode(ids)
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == n:
                return text
            ids = (encoded + self.rng.choice(self.ids, size=n).tolist())[:n]
        return self.tokenizer.decode(ids)


def _plain(text: str) -> bool:
    return bool(text.strip()) and text.isascii() and text.isprintable()


def lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> list[int]:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (r = 0: all `mean`)."""
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def make_requests(dataset: str, n: int, *, tokenizer, input_len: int, output_len: int,
                  range_ratio: float = 0.0, prefix_len: int = 0, long_len: int = 0,
                  long_every: int = 8, seed: int = 0) -> list[BenchRequest]:
    """`n` requests of `dataset` (random | shared-prefix | long-prompt | chat), the same for
    the same seed."""
    rng = np.random.default_rng(seed)
    outputs = lengths(rng, n, output_len, range_ratio)
    if dataset == "chat":
        return [BenchRequest(({"role": "user", "content": prompt},),
                             len(tokenizer.encode(prompt, add_special_tokens=False)), out)
                for prompt, out in zip((CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(n)),
                                       outputs)]
    source = TextSource(tokenizer, seed)
    inputs = lengths(rng, n, input_len, range_ratio)
    if dataset == "random":
        return [BenchRequest(({"role": "user", "content": source.text(m)},), m, out)
                for m, out in zip(inputs, outputs)]
    if dataset == "long-prompt":
        if long_len < 1 or long_every < 1:
            raise ValueError("the long-prompt dataset needs a long length and a period of 1 "
                             "or more")
        inputs = [long_len if i % long_every == long_every - 1 else m
                  for i, m in enumerate(inputs)]
        return [BenchRequest(({"role": "user", "content": source.text(m)},), m, out)
                for m, out in zip(inputs, outputs)]
    if dataset == "shared-prefix":
        if prefix_len < 1:
            raise ValueError("the shared-prefix dataset needs a prefix length of 1 or more")
        system = {"role": "system", "content": source.text(prefix_len)}
        return [BenchRequest((system, {"role": "user", "content": source.text(m)}),
                             prefix_len + m, out) for m, out in zip(inputs, outputs)]
    raise ValueError(f"unknown dataset {dataset!r}: random, shared-prefix or chat")
