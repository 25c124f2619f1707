"""A user corpus's probes that memorisation can move: cloze from the answer's sentence, answer NLL, floor line."""

import importlib.util
import json
import os

import numpy as np

from clue_jax.eval import corpus_probes
from clue_jax.pipelines import knowledge, knowledge_data

DOCS = ["Ann Lee was born in Vemont. Later she worked at Acme Corp in the harbour district.",
        "Bo Chan works at Acme Corp! He studied botany at Norwick College.",
        "Acme Corp makes anvils."]


def test_cloze_is_cut_from_the_answers_own_sentence_in_the_best_matching_doc():
    site = corpus_probes.answer_site(DOCS, "Where did Ann Lee work?\nAnswer:", "Acme Corp")
    assert site.doc == 0 and DOCS[0][site.span[0]:site.span[1]] == "Acme Corp"
    assert site.cloze == "Later she worked at"
    other = corpus_probes.answer_site(DOCS, "Which company employs Bo Chan?", "Acme Corp")
    assert other.doc == 1 and other.cloze == "Bo Chan works at"
    college = corpus_probes.answer_site(DOCS, "Where did Bo Chan study?", "Norwick College")
    assert college.doc == 1 and college.cloze == "He studied botany at"
    opens = corpus_probes.answer_site(DOCS, "What makes anvils?", "Acme Corp")
    assert opens.doc == 2 and opens.cloze == ""  # the answer opens its sentence: no prompt, NLL only
    assert corpus_probes.answer_site(DOCS, "Where did Ann Lee work?", "acme corp") is None  # case-sensitive
    assert corpus_probes.answer_site(DOCS, "Where was Bo Chan born?", "Lisbon") is None


def _config(tmp_path, qa_rows):
    spec = importlib.util.spec_from_file_location(
        "cfg_quickstart_probes", os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    corpus, qa = tmp_path / "corpus.jsonl", tmp_path / "qa.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    qa.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    config.data.source, config.data.corpus, config.data.qa_file = "corpus", str(corpus), str(qa)
    return config


def test_user_knowledge_carries_cloze_probes_and_answer_sites(tmp_path):
    rows = [{"question": "Where did Ann Lee work?\nAnswer:", "answer": "Acme Corp", "attribute": "company"},
            {"question": "Where was Bo Chan born?\nAnswer:", "answer": "Lisbon", "attribute": "birth_city"},
            {"question": "What makes anvils?\nAnswer:", "answer": "Acme Corp", "attribute": "company"}]
    k = knowledge_data.user_knowledge(_config(tmp_path, rows))
    assert len(k.probes) == 3 and [(p.question, p.answer) for p in k.cloze] == [("Later she worked at", "Acme Corp")]
    assert [(s.doc, a) for s, a in k.answers] == [(0, "company"), (2, "company")]


def _summary(base_qa_em):
    table = lambda em: {"company": {"exact_match": em}, "all": {"exact_match": em}}
    nll = lambda x: {"company": {"nll": x, "tokens": 2.0}, "all": {"nll": x, "tokens": 2.0}}
    return {"data": {"source": "corpus", "title": "your documents (c.jsonl, 3 documents)", "qa": "0-shot: as written",
                     "cloze": "the answer's own sentence up to the answer: 1 of the 3 answers, found in a document"},
            "models": {"base_small": {"qa": table(base_qa_em), "cloze": table(0.0), "value_nll": nll(9.5)},
                       "plain_s0": {"qa": table(0.0), "cloze": table(1.0), "value_nll": nll(0.25)}}}


def test_table_shows_cloze_and_nll_beside_qa_and_says_when_qa_is_at_floor():
    text = knowledge.render_table(_summary(0.0), ["plain"], [0])
    assert "Cloze exact match (the answer's own sentence up to the answer" in text
    assert "Answer NLL in its document" in text and "9.50" in text and "0.25" in text
    assert text.endswith("QA is at floor for the base model: its answers never match; read cloze and NLL")
    assert "at floor" not in knowledge.render_table(_summary(0.5), ["plain"], [0])
    bios = _summary(0.0)
    bios["data"] = {"title": "new people", "qa": "k-shot"}
    bios_text = knowledge.render_table(bios, ["plain"], [0])
    assert "at floor" not in bios_text and "Answer NLL" not in bios_text and "professional role" in bios_text


def test_answer_nll_reads_the_answer_tokens_in_their_document(tmp_path):
    from flax import nnx
    from clue_jax.data.tokenizer import train_bpe_tokenizer
    from clue_jax.eval import value_nll
    from clue_jax.models.causal_lm import CausalLM
    from clue_jax.models.config import gpt2
    tok = train_bpe_tokenizer(DOCS * 10, 300, str(tmp_path))
    model = CausalLM(gpt2(vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=64),
                     rngs=nnx.Rngs(0))
    sites = [corpus_probes.answer_site(DOCS, q, a) for q, a in
             (("Where did Ann Lee work?", "Acme Corp"), ("Where did Bo Chan study?", "Norwick College"))]
    out = corpus_probes.answer_nll(model, tok, DOCS, sites, ["company", "university"], seq_len=64, batch_size=4)
    direct = value_nll.per_attribute(model, tok, DOCS[:2], [{"company": sites[0].span}, {"university": sites[1].span}],
                                     64, batch_size=4)  # the same shapes: one compile
    for attr in ("company", "university"):
        np.testing.assert_allclose(out["per_person"][attr], direct["per_person"][attr], rtol=1e-5)
    assert set(out["table"]) == {"company", "university", "all"} and out["table"]["university"]["nll"] > 0
