"""The values' NLL per attribute: the tokens of each value, summed, against a direct forward pass."""
import jax
import numpy as np
from flax import nnx

from clue_jax.data import bios
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.eval import value_nll
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models.config import ModelConfig


def test_per_attribute_nll_sums_the_value_tokens(tmp_path):
    world = bios.build_world(bios.WorldConfig(seed=3, num_background=20, num_new=4))
    people = list(world.new)
    docs = [bios.paper_bio(p) for p in people]
    tok = train_bpe_tokenizer(docs + [bios.paper_bio(p) for p in world.background], 400, str(tmp_path))
    spans = [bios.attribute_spans(t, p) for t, p in zip(docs, people)]
    model = CausalLM(ModelConfig.from_dict(dict(flavour="llama", vocab_size=len(tok), d_model=32, num_layers=1,
                                                num_heads=2, mlp_dim=64, max_len=128)), rngs=nnx.Rngs(0))
    out = value_nll.per_attribute(model, tok, docs, spans, seq_len=128, batch_size=3)  # 4 docs: a padded batch

    company = people[0].company
    pos = value_nll.value_positions(tok, docs[0], spans[0]["company"])
    ids = [tok.bos_token_id] + tok(docs[0], add_special_tokens=False)["input_ids"]
    assert tok.decode([ids[j] for j in pos]).strip() == company  # exactly the value's tokens
    logits = np.asarray(model(np.asarray([ids]), attention_mask=np.ones((1, len(ids)), np.int32)))[0]
    logp = logits - np.asarray(jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    direct = -sum(logp[j - 1, ids[j]] for j in pos)
    np.testing.assert_allclose(out["per_person"]["company"][0], direct, rtol=1e-4)
    assert set(out["table"]) == set(bios.PAPER_ATTRIBUTES) | {"all"}
    assert len(out["per_person"]["major"]) == 4
    np.testing.assert_allclose(out["table"]["company"]["nll"], np.mean(out["per_person"]["company"]), rtol=1e-6)
    assert out["table"]["company"]["tokens"] >= 1
