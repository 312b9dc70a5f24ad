"""The small tokenizer API the trainer needs, and two implementations of it.

``ByteTokenizer`` ships with the package (no download, no files): one token per UTF-8 byte
plus pad/bos/eos. ``HFTokenizer`` wraps a Hugging Face tokenizer loaded from the model's
local directory.
"""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-2 are pad, bos, eos; byte b is id b + 3."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the same four members as ``ByteTokenizer``."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        # LLaMA tokenizers have no pad token; padding positions are masked out anyway
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
