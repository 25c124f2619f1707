"""Token arrays for causal-LM training: packed streams and one-example-per-row.

Pre-training packs documents (BOS doc EOS) into full rows, so no compute is
spent on padding. Knowledge learning keeps one document per row, because
clue dropout deletes tokens within an example and the QA evaluation asks
about each document on its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from clue_jax.data.tokenizer import encode_batch
from clue_jax.errors import UserInputError


def pack_documents(tokenizer, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenates `<bos> text <eos>` documents and cuts the stream into [N, seq_len] rows."""
    if not texts:
        raise UserInputError("empty corpus: nothing to pack for pre-training")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for body in encoded:
        stream.extend([tokenizer.bos_token_id, *body, tokenizer.eos_token_id])
    rows = len(stream) // seq_len
    if rows == 0:
        raise UserInputError(f"corpus has {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    ids = np.asarray(stream[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def one_per_row(tokenizer, texts: Sequence[str], seq_len: int, on_overflow: str = "error") -> dict[str, np.ndarray]:
    """`<bos> text <eos>` per row, right-padded; a text longer than seq_len is an error
    (documents to learn must fit whole) unless on_overflow="truncate"."""
    if not texts:
        raise UserInputError("empty corpus: no documents to learn")
    ids, mask = encode_batch(tokenizer, texts, seq_len, add_bos=True, add_eos=True, on_overflow=on_overflow)
    return {"input_ids": ids, "attention_mask": mask}
