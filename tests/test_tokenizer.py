"""Byte-level BPE training, HF round trip, fixed-shape batches, protected ids."""

import numpy as np
import pytest
import transformers

from clue_jax.data import bios, tokenizer as tk
from clue_jax.errors import UserInputError


@pytest.fixture(scope="module")
def texts():
    world = bios.build_world(bios.WorldConfig(seed=1, num_background=60, num_new=0))
    records = bios.world_records(world, "background")
    return [r["bio"] for r in records] + [r["bio_rich"] for r in records]


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("tok")
    return tk.train_bpe_tokenizer(iter(texts), vocab_size=600, save_dir=save_dir), save_dir


def test_round_trip_and_reload(trained, texts):
    tok, save_dir = trained
    assert 300 < len(tok) <= 600
    loaded = tk.load_tokenizer(save_dir)
    odd = "  Ünïcødé 日本 \n\ttabs,and.dots!  "  # bytes never seen in training
    for text in texts[:20] + [odd]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert loaded.encode(text, add_special_tokens=False) == ids
    assert len(tok.encode(texts[0], add_special_tokens=False)) < len(texts[0]) / 2  # merges learned
    specials = [loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token_id]
    assert len(set(specials)) == 4 and None not in specials
    assert loaded.convert_ids_to_tokens(specials) == ["<bos>", "<eos>", "<pad>", "<mask>"]
    assert isinstance(transformers.AutoTokenizer.from_pretrained(str(save_dir)),
                      transformers.PreTrainedTokenizerBase)


def test_the_saved_tokenizer_puts_bos_first_exactly_as_training_does(trained, texts):
    """transformers users get BOS + text from `tok(prompt)`; training, which adds BOS itself, still adds it once."""
    from clue_jax.data import lm_data

    tok, save_dir = trained
    user = transformers.AutoTokenizer.from_pretrained(str(save_dir))
    prompts = ["What is the birth city of Ann Lee?\nAnswer:", texts[0]]
    for prompt in prompts:
        bare = user(prompt, add_special_tokens=False)["input_ids"]
        ids, mask = tk.encode_batch(tok, [prompt], len(bare) + 4)
        assert user(prompt)["input_ids"] == ids[0][mask[0] == 1].tolist() == [tok.bos_token_id, *bare]
    assert user(prompts[0], prompts[1])["input_ids"][0] == tok.bos_token_id
    rows = lm_data.one_per_row(tok, prompts, 200)
    assert [(row == tok.bos_token_id).sum() for row in rows["input_ids"]] == [1, 1]
    packed = lm_data.pack_documents(tok, prompts * 4, 16)["input_ids"]
    assert (packed == tok.bos_token_id).sum() == 8


def test_a_tokenizer_without_the_rule_gets_it_before_saving(trained, tmp_path):
    """A pretrained tokenizer (or one trained before the rule) adds nothing; save_bos_first gives it the rule."""
    from tokenizers import processors

    _, save_dir = trained
    plain = tk.load_tokenizer(save_dir)
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    assert plain("Ann")["input_ids"][0] != plain.bos_token_id
    tk.save_bos_first(plain, str(tmp_path))
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))("Ann")["input_ids"] == [
        plain.bos_token_id, *plain("Ann", add_special_tokens=False)["input_ids"]]


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(UserInputError, match="vocab_size 100"):
        tk.train_bpe_tokenizer(["a b"], vocab_size=100, save_dir=tmp_path)


def test_encode_batch_padding_masks_overflow(trained):
    tok, _ = trained
    texts = ["Ann was born.", "He had a professional role at a company, long ago."]
    lengths = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    max_len = lengths[1] + 3
    ids, mask = tk.encode_batch(tok, texts, max_len, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, max_len)
    assert mask.sum(1).tolist() == [n + 2 for n in lengths]
    assert ids[0, 0] == tok.bos_token_id and ids[0, lengths[0] + 1] == tok.eos_token_id
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert tok.decode(ids[1, 1:lengths[1] + 1].tolist()) == texts[1]

    left, left_mask = tk.encode_batch(tok, texts, max_len, padding_side="left")
    assert left_mask[0, -1] == 1 and left_mask[0, 0] == 0
    assert left[0, max_len - lengths[0] - 1] == tok.bos_token_id
    right, right_mask = tk.encode_batch(tok, texts, max_len)
    assert (left[left_mask == 1] == right[right_mask == 1]).all()

    with pytest.raises(UserInputError, match=f"sequence too long: example 1 has {lengths[1] + 1}"):
        tk.encode_batch(tok, texts, lengths[1])
    cut, cut_mask = tk.encode_batch(tok, texts, 4, add_eos=True, on_overflow="truncate")
    assert cut_mask.all() and cut[1].tolist() == [tok.bos_token_id] + tok.encode(
        texts[1], add_special_tokens=False)[:3]


def test_protected_ids_cover_every_comma_and_period(trained, texts):
    tok, _ = trained
    protected = tk.protected_token_ids(tok)
    assert tok.bos_token_id in protected
    assert tok.eos_token_id not in protected and tok.pad_token_id not in protected  # padding: by the mask
    for text in texts[:10]:
        ids = tok.encode(text, add_special_tokens=False)
        hits = sum(i in protected for i in ids)
        assert hits == text.count(",") + text.count(".")
    extra = tk.protected_token_ids(tok, extra=["!", 7])
    assert set(extra) - set(protected) == {tok.convert_tokens_to_ids("!"), 7}


def test_load_tokenizer_errors_and_pad_fallback(tmp_path, trained):
    with pytest.raises(UserInputError, match="not a tokenizer directory"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(UserInputError, match="not a tokenizer directory"):
        tk.load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserInputError, match="cannot load tokenizer"):
        tk.load_tokenizer(tmp_path)
    tok, _ = trained
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer,
                                                eos_token="<eos>")
    bare_dir = tmp_path / "bare"
    bare.save_pretrained(str(bare_dir))
    loaded = tk.load_tokenizer(bare_dir)
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id
    assert loaded.bos_token_id == tok.eos_token_id


def test_protection_rule_on_a_byte_level_vocabulary_with_merged_pieces():
    """LLaMA-3-style byte-level BPE: ".\n" and " ," are merged pieces; ")." is not punctuation alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [(".", "Ċ"), ("Ġ", ","), (")", "."), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|begin_of_text|>", "<|end_of_text|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                               eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    protected = set(tk.protected_token_ids(tok))
    expected = {vocab["."], vocab[","], vocab[".Ċ"], vocab["Ġ,"], tok.bos_token_id}  # not EOS, though it pads
    assert protected == expected
    assert vocab[")."] in tok.encode("a). a ,", add_special_tokens=False)
    assert tok.encode(".\n", add_special_tokens=False) == [vocab[".Ċ"]]


def test_teachers_with_different_tokenizers_are_refused(tmp_path, trained, texts):
    tok, _ = trained
    same, other = tmp_path / "same", tmp_path / "other"
    tok.save_pretrained(str(same))
    tk.train_bpe_tokenizer(texts[::-1][:40], 300, other)
    tk.require_same_tokenizer({"base_models.small": str(same), "base_models.large": str(same), "tokenizer.path": ""})
    tk.require_same_tokenizer({"base_models.small": str(same), "base_models.large": str(tmp_path / "no_files")})
    with pytest.raises(UserInputError, match=r"base_models.large .* and base_models.small .* different tokenizers"):
        tk.require_same_tokenizer({"base_models.small": str(same), "base_models.large": str(other)})
