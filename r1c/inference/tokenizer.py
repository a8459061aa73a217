"""Tokenizers for text prompts: a Hugging Face `tokenizer.json` (the tokenizers library) or `bytes`, UTF-8 bytes as
ids (what `r1c train` feeds r1-tiny from text files: r1c/train/data.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from r1c.api import InputError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the bytes of UTF-8 text. Decoding shows an id past 255 (a model's vocabulary may be larger
    than the bytes) and any invalid UTF-8 as U+FFFD rather than failing: generated text is shown, not parsed."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace") + "\ufffd")
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizers.Tokenizer from a tokenizer.json. Encoding applies its post-processor (a DeepSeek tokenizer adds
    BOS, as HF's AutoTokenizer does by default); decoding leaves special tokens out."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a file it cannot parse
            raise InputError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes`, or the path of a Hugging Face tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no such tokenizer file: {path} (expected a tokenizer.json or the word 'bytes')")
    return HFTokenizer(path)
