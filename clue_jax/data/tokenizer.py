"""Tokenizers: train a small byte-level BPE, load any HF tokenizer, encode fixed-shape batches.

Why byte-level BPE: every string round-trips exactly (no unknown token, spaces kept),
which the clue-dropout and QA exact-match code rely on. Trained tokenizers are saved
as ordinary HF tokenizer directories, so `transformers.AutoTokenizer` loads them like
a pretrained model's tokenizer.

Training never relies on a tokenizer's own special tokens: every path encodes
with add_special_tokens=False and `encode_batch` (or `pack_documents`) adds
BOS/EOS itself, the same way for every tokenizer family. A tokenizer that
leaves the project (a trained one, an export) carries that rule as its
post-processor (`bos_first`), so `tokenizer(prompt)` in transformers gives
exactly the ids the model was trained on: BOS, then the text.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError

BOS, EOS, PAD, MASK = "<bos>", "<eos>", "<pad>", "<mask>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK)  # ids 0, 1, 2, 3 in a trained tokenizer
PROTECTED_PUNCTUATION = (",", ".")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        save_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts` and saves it to `save_dir` (save_pretrained).

    The full 256-byte alphabet is always in the vocabulary, so vocab_size must
    exceed 256 + the 4 special tokens <bos>, <eos>, <pad>, <mask> (<mask> serves encoders).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserInputError(f"tokenizer vocab_size {vocab_size} is too small (minimum {minimum})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK)
    os.makedirs(save_dir, exist_ok=True)
    save_bos_first(fast, os.fspath(save_dir))
    return fast


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer directory (local files only) and makes sure BOS/EOS/PAD exist.

    A tokenizer without a pad token gets EOS as pad (LLaMA-3 / GPT-2 style; padding
    is always masked out, so the choice only has to be a valid id); one without BOS
    gets EOS as BOS (GPT-2's convention). A tokenizer with no EOS is refused.
    """
    path = paths.local_dir(path) if paths.is_remote(path) else os.fspath(path)  # a bucket: via the local cache
    if not _has_tokenizer_files(path):
        raise UserInputError(f"not a tokenizer directory: {path} (no tokenizer.json or "
                             "tokenizer_config.json)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # corrupt json, missing sentencepiece, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"cannot load tokenizer from {path}: {first}") from e
    if tok.eos_token_id is None:
        raise UserInputError(f"tokenizer {path} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token
    return tok


def bos_first(tokenizer) -> None:
    """Sets the post-processor so that `tokenizer(text)` is BOS + text (no EOS), as `encode_batch` feeds a prompt.

    A pair is BOS + a + b. Only the add_special_tokens=True path changes;
    training's add_special_tokens=False encodings stay the bare text.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} is not a fast "
                             f"(tokenizers) tokenizer, so it cannot be given the rule that puts "
                             f"{tokenizer.bos_token} first as training did")
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tokenizer.bos_token_id)])


def save_bos_first(tokenizer, directory: str, probe: str = "What is the birth city of Ann Lee?\nAnswer:") -> None:
    """Saves `tokenizer` with the `bos_first` rule and checks it as a user meets it:
    `transformers.AutoTokenizer.from_pretrained(directory)(probe)` must equal the ids training feeds."""
    bos_first(tokenizer)
    tokenizer.save_pretrained(directory)
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids, mask = encode_batch(tokenizer, [probe], len(body) + 1)
    expected = ids[0][mask[0] == 1].tolist()
    got = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)(probe)["input_ids"]
    if got != expected:
        raise UserInputError(f"the tokenizer saved to {directory} encodes {probe!r} as {got[:8]}..., not as "
                             f"training did ({expected[:8]}...)")


def encode_batch(tokenizer, texts: Sequence[str], max_len: int, add_bos: bool = True,
                 add_eos: bool = False, on_overflow: str = "error",
                 padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Fixed-shape ids and mask, both int32 [N, max_len], padded with the pad id.

    on_overflow="error" raises UserInputError naming the first example longer than
    max_len (BOS/EOS included); "truncate" keeps the first max_len tokens (so a
    truncated example loses its EOS: it did not end there).
    """
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prefix = [tokenizer.bos_token_id] if add_bos else []
    suffix = [tokenizer.eos_token_id] if add_eos else []
    ids = np.full((len(texts), max_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    for i, body in enumerate(encoded):
        seq = prefix + list(body) + suffix
        if len(seq) > max_len:
            if on_overflow == "error":
                raise UserInputError(f"sequence too long: example {i} has {len(seq)} tokens "
                                     f"(max_len {max_len})")
            seq = seq[:max_len]
        start = 0 if padding_side == "right" else max_len - len(seq)
        ids[i, start:start + len(seq)] = seq
        mask[i, start:start + len(seq)] = 1
    return ids, mask


def require_same_tokenizer(paths: dict[str, str]) -> None:
    """Refuses teachers (and a student) whose tokenizers differ: the contrast d = s_large - s_small
    compares two models token by token, which means nothing if they cut the text differently.

    paths: {config key: directory}; entries without tokenizer files are skipped
    (their vocabulary size is checked against the tokenizer elsewhere).
    """
    loaded = {key: load_tokenizer(path) for key, path in paths.items() if path and _has_tokenizer_files(path)}
    if len(loaded) < 2:
        return
    (first_key, first), *rest = loaded.items()
    reference = first.get_vocab()
    for key, tok in rest:
        vocab = tok.get_vocab()
        if vocab == reference and tok.bos_token_id == first.bos_token_id and tok.eos_token_id == first.eos_token_id:
            continue
        differ = sorted(set(vocab.items()) ^ set(reference.items()))[:1]
        what = f"first difference: {differ[0]!r}" if differ else "their BOS/EOS ids differ"
        raise UserInputError(f"{key} ({paths[key]}) and {first_key} ({paths[first_key]}) have different tokenizers "
                             f"({len(vocab)} vs {len(reference)} entries, {what}); teachers and student must share one")


def _has_tokenizer_files(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def protected_token_ids(tokenizer, extra: Iterable[int | str] = ()) -> list[int]:
    """Ids that clue dropout never drops: one rule for every vocabulary.

    - every vocabulary entry whose text without whitespace is "," or "." (so
      " .", ".\n" and "\u2581," count; merged pieces such as ")." do not);
    - BOS, as the paper says. EOS is not protected (the paper names only BOS
      and the two marks), also where a tokenizer pads with EOS: padding is
      protected by the attention mask, not by its id, so the rule does not
      depend on the family. Where BOS and EOS are one id (GPT-2), it is kept.
    `extra` adds ids, or strings that must encode to a single token.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    ids = {i for i, text in enumerate(texts) if "".join(text.split()) in PROTECTED_PUNCTUATION}
    ids.add(tokenizer.bos_token_id)
    for item in extra:
        if isinstance(item, str):
            pieces = tokenizer.encode(item, add_special_tokens=False)
            if len(pieces) != 1:
                raise UserInputError(f"protected token {item!r} is {len(pieces)} tokens, not one")
            item = pieces[0]
        ids.add(int(item))
    ids.discard(None)
    return sorted(ids)
