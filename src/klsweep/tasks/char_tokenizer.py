"""A character-level tokenizer built with the ``tokenizers`` library from a task's own text,
for models trained from scratch on it: one token per character that occurs, and four
special tokens (padding, BOS, EOS, unknown). Written as ``tokenizer.json`` it loads with
``tokenizers.Tokenizer.from_file`` (or transformers' ``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class CharTokenizer:
    """Characters of ``texts`` as tokens, in sorted order after the special tokens (so that
    the same texts give the same ids)."""

    def __init__(self, texts: Iterable[str]) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        chars = sorted(set().union(*(set(text) for text in texts)))
        vocab = {token: i for i, token in enumerate([*SPECIALS, *chars])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        # every character its own piece, whitespace and newlines included
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens(list(SPECIALS))
        self.inner = tokenizer
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (vocab[t] for t in SPECIALS)

    def __len__(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, rows: list[list[int]]) -> list[str]:
        """Each row's text, special tokens left out."""
        return self.inner.decode_batch(rows, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.inner.save(str(path))
