"""Validation before the first training step: each fault, then the one
line that names it. Unit tests call the checks directly; a few CLI runs show exit code 2, that nothing trained
and that what was saved is unchanged."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from flax import nnx

from clue_jax import config_check
from clue_jax.data import corpus
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models.config import ModelConfig, gpt2
from clue_jax.pipelines import foundations, knowledge, knowledge_data, replicate
from clue_jax.pipelines.validate import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = QUICKSTART + ":tiny"


def _config(name="quickstart", variant="tiny") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _cli(*args, timeout=300):
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "clue_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _user_files(tmp_path, docs=("Ann Lee works at Acme Corp.", "Bo Chan studied botany in Vemont."),
                qa='{"question": "Where does Ann Lee work?\\nAnswer:", "answer": "Acme Corp", "attribute": "company"}\n'):
    c = tmp_path / "corpus.jsonl"
    c.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    q = tmp_path / "qa.jsonl"
    q.write_text(qa)
    return c, q


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["Ann Lee works at Acme Corp.", "Bo Chan studied botany in Vemont."] * 20
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------ config values
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py"))))
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_every_shipped_config_passes(path, variant):
    check_config(_config(os.path.basename(path)[:-3], variant))


@pytest.mark.parametrize("key, value, expected", [
    ("cpt.batch_size", 0, "--config.cpt.batch_size=0: must be a positive integer"),
    ("pretrain.checkpoint_every", 0, "--config.pretrain.checkpoint_every=0: must be a positive integer"),
    ("cpt.steps", -5, "--config.cpt.steps=-5: must be a positive integer"),
    ("seeds", (1.5,), "--config.seeds=(1.5,): item 1.5 must be an integer >= 0"),
    ("clues.alpha", 1.5, "--config.clues.alpha=1.5: must be a number in [0, 1]"),
    ("clues.mode", "offline", "--config.clues.mode='offline': must be one of cached, live, fixed_copies"),
    ("cpt.schedule", "cos", "--config.cpt.schedule='cos': must be one of cosine, linear, constant"),
    ("eval.primary", "em", "--config.eval.primary='em': must be one of cloze, qa"),
    ("cpt.lr", 0.0, "--config.cpt.lr=0.0: must be a number > 0"),
    ("clues.arms", ("plain,contrast",), "--config.clues.arms=('plain,contrast',): item 'plain,contrast' must be "
     "one of plain, random, attention, contrast, rate_matched, shuffled; a tuple is written --config.clues.arms=\"('plain','contrast')\""),
])
def test_bad_value_is_one_line_naming_key_value_and_allowed(key, value, expected):
    config = _config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(UserInputError) as err:
        check_config(config)
    assert str(err.value) == expected


def test_all_bad_values_are_listed_together():
    config = _config()
    config.cpt.batch_size, config.eval.k_shot = 0, -1
    with pytest.raises(UserInputError, match=r"cpt.batch_size=0: .*; --config.eval.k_shot=-1: must be an integer >= 0"):
        check_config(config)


def test_unparsable_value_names_the_expected_type():
    argv = ["main", "--config", TINY, "--config.cpt.lr=abc"]
    err = flags.IllegalFlagValueError("flag --config.cpt.lr=abc: could not convert string to float: 'abc'")
    assert config_check.explain_flag_error(err, argv) == \
        "--config.cpt.lr=abc: config key 'cpt.lr' expects a number (now 0.001)"
    argv = ["main", "--config", TINY, "--config.cpt.steps=1.5"]
    err = flags.IllegalFlagValueError("flag --config.cpt.steps=1.5: invalid literal for int() with base 10: '1.5'")
    assert config_check.explain_flag_error(err, argv) == \
        "--config.cpt.steps=1.5: config key 'cpt.steps' expects an integer (now 4)"


def test_cli_bad_type_and_unknown_variant_are_one_line():
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w", "--config.cpt.lr=abc"))
    assert "expects a number" in line and "unknown config key" not in line
    line = _one_line_error(_cli("--config", QUICKSTART + ":nope", "--workdir", "/nonexistent/w"))
    assert line == f"error: unknown variant 'nope' for configs/quickstart.py (--config {QUICKSTART}:nope); " \
                   "valid variants: tiny"


def test_cli_bad_value_leaves_saved_config_untouched(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"saved": true}')
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(workdir), "--config.cpt.batch_size=0"))
    assert line == "error: --config.cpt.batch_size=0: must be a positive integer"
    assert (workdir / "config.json").read_text() == '{"saved": true}'
    assert not (workdir / "stages").exists()


# ------------------------------------------------------------------ corpus flags
def test_corpus_flag_sets_the_source(tmp_path):
    config = _config()
    config.data.corpus, config.data.qa_file = "docs.jsonl", "qa.jsonl"
    check_config(config)
    assert config.data.source == "corpus"


def test_qa_file_without_corpus_or_corpus_without_qa_is_refused():
    config = _config()
    config.data.qa_file = "qa.jsonl"
    with pytest.raises(UserInputError, match="data.qa_file is set without --config.data.corpus"):
        check_config(config)
    config = _config()
    config.data.corpus = "docs.jsonl"  # today's fault: `cannot read : No such file or directory` after training
    with pytest.raises(UserInputError, match=r"data.source='corpus' needs --config.data.qa_file=FILE"):
        check_config(config)


# ------------------------------------------------------------------ the user's files, before training
def test_missing_and_bad_qa_file_name_file_line_and_key(tmp_path):
    docs, _ = _user_files(tmp_path)
    config = _config()
    config.data.update(source="corpus", corpus=str(docs), qa_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserInputError, match=rf"cannot read {tmp_path}/missing.jsonl: No such file or directory "
                                             r"\(--config.data.qa_file\)"):
        knowledge_data.user_knowledge(config)
    _, qa = _user_files(tmp_path, qa='{"question": "q?", "answer": "Acme"}\n{"question": "r?"}\n')
    config.data.qa_file = str(qa)
    with pytest.raises(UserInputError, match=rf"{qa}:2: missing field 'answer' .* \(--config.data.qa_file\)"):
        knowledge_data.user_knowledge(config)


def test_txt_corpus_documents_carry_their_first_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\nfirst doc\nstill first\n\n\nsecond doc\n")
    assert corpus.corpus_documents(path) == [(2, "first doc\nstill first"), (6, "second doc")]


def test_long_document_names_file_line_and_key(tmp_path, tokenizer):
    docs, qa = _user_files(tmp_path, docs=("short.", "Ann Lee works at Acme Corp. " * 8, "short too."))
    config = _config()
    config.data.update(source="corpus", corpus=str(docs), qa_file=str(qa))
    user = knowledge_data.user_knowledge(config)
    with pytest.raises(UserInputError) as err:
        knowledge_data.documents_data(tokenizer, user, 20)
    n = len(tokenizer("Ann Lee works at Acme Corp. " * 8, add_special_tokens=False)["input_ids"]) + 2
    assert str(err.value) == (
        f"{docs}:2: document has {n} tokens (with <bos> and <eos>), more than cpt.seq_len=20; 1 of 3 documents "
        f"are too long, the longest ({docs}:2) has {n}: raise --config.cpt.seq_len to at least {n}")
    assert knowledge_data.documents_data(tokenizer, user, n)["input_ids"].shape == (3, n)


def test_cli_long_document_stops_before_any_pre_training(tmp_path):
    docs, qa = _user_files(tmp_path, docs=("short.", "Ann Lee works at Acme Corp. " * 60))
    workdir = tmp_path / "w"
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(workdir), f"--config.data.corpus={docs}",
                                f"--config.data.qa_file={qa}"))
    assert f"{docs}:2: document has" in line and "--config.cpt.seq_len" in line
    assert sorted(os.listdir(workdir / "stages")) == ["tokenizer", "world"]  # no base model trained
    assert not (workdir / "config.running.json").exists()  # the refused config did not run


# ------------------------------------------------------------------ vocabulary and positions
def test_checkpoint_vocab_smaller_than_tokenizer_and_too_few_positions(tmp_path, tokenizer):
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "model_config.json").write_text(json.dumps(gpt2(vocab_size=100, max_len=512).to_dict()))
    config = _config()
    config.base_models.small = str(model_dir)
    with pytest.raises(UserInputError, match=rf"base_models.small={model_dir} has vocab_size=100, fewer than the "
                                             rf"tokenizer's {len(tokenizer)} tokens"):
        foundations.check_base_checkpoints(config, tokenizer)
    (model_dir / "model_config.json").write_text(json.dumps(gpt2(vocab_size=400, max_len=64).to_dict()))
    with pytest.raises(UserInputError, match=rf"base_models.small={model_dir} \(gpt2\) has max_len=64 positions, "
                                             r"fewer than cpt.seq_len=160: lower --config.cpt.seq_len to at most 64"):
        foundations.check_base_checkpoints(config, tokenizer)


def test_model_pre_trained_here_needs_positions_for_seq_len():
    config = _config()
    config.models.small.update(flavour="gpt2", max_len=100)
    with pytest.raises(UserInputError, match=r"models.small \(gpt2\) has max_len=100 positions, fewer than "
                                             r"pretrain.seq_len=128: raise --config.models.small.max_len"):
        check_config(config)


def test_gpt2_refuses_sequences_past_its_positions():
    model = CausalLM(ModelConfig(flavour="gpt2", vocab_size=32, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                                 max_len=8), rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 32)
    with pytest.raises(UserInputError, match="sequence length 9 exceeds the GPT-2 model's max_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))


# ------------------------------------------------------------------ tables about the user's data
def _corpus_summary():
    run = {"qa": {"company": {"exact_match": 0.5, "f1": 0.5}, "all": {"exact_match": 0.5, "f1": 0.5}}}
    data = {"source": "corpus", "k_shot": 0, "documents": 2, "questions": 1,
            "title": "your documents (corpus.jsonl, 2 documents)", "qa": "0-shot: the 1 questions of qa.jsonl"}
    return run, data


def test_knowledge_table_is_headed_with_the_users_files_and_shots():
    run, data = _corpus_summary()
    text = knowledge.render_table({"models": {"base_small": run, "plain_s0": run}, "data": data}, ["plain"], [0])
    assert text.splitlines()[0] == "QA exact match (0-shot: the 1 questions of qa.jsonl), your documents " \
                                   "(corpus.jsonl, 2 documents):"
    assert "new people" not in text and "What is the company" not in text


def test_replication_report_is_headed_with_the_users_files():
    run, data = _corpus_summary()
    config = _config("replicate_bios")
    config.grid.enabled = False
    run = {**run, "per_person": {"qa": {"all": [1.0, 0.0]}}}  # a QA file without attributes
    results = {"small": {"base": [run], "contrast": [run], "plain": [run]}}
    gate = replicate.gate.teacher_gate({"all": 0.1, "company": 0.1}, {"all": 0.5, "company": 0.5}, [], [])
    summary = {"primary": "qa", "chosen": {}, "grid": {}, "distance_from_name": {}, "clue_analysis": {}, "data": data,
               "teacher_gate": gate, "protocols": {"paper": {"steps": {"plain": 1, "contrast": 11}, "results": results,
                                                            "comparisons": replicate.comparisons(results, config)}}}
    text = replicate.render_report(summary, config)
    assert text.startswith("# Clue dropout on your documents (corpus.jsonl, 2 documents)")
    assert "questions: 0-shot" in text and "dev people" not in text and "biograph" not in text
    # the comparison falls back to 'all' when the QA file has no far attributes
    assert "- small: contrast - plain on the far attributes: qa +0.000" in text


@pytest.mark.slow
def test_cli_user_corpus_tables_and_a_new_corpus_reuses_the_base_model(tmp_path):
    docs, qa = _user_files(tmp_path)
    workdir = tmp_path / "w"
    args = ("--config", TINY, "--workdir", str(workdir), f"--config.data.corpus={docs}",
            f"--config.data.qa_file={qa}", "--config.clues.arms=('plain',)", "--config.clues.render_examples=0")
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "QA exact match (0-shot: the 1 questions of qa.jsonl, asked as written), your documents " \
           "(corpus.jsonl, 2 documents):" in first.stdout
    assert "Cloze exact match (the answer's own sentence up to the answer: 1 of the 1 answers" in first.stdout
    assert "Answer NLL in its document (nats per answer, lower is better)" in first.stdout
    assert "data.source set to 'corpus'" in first.stderr
    docs.write_text(json.dumps({"text": "Ann Lee works at Zeta Inc."}) + "\n")
    second = _cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"tokenizer", "pretrain_small"} <= set(summary["stages_reused"])
    assert "cpt_small_plain_s0" in summary["stages_ran"]
    assert summary["data"]["documents"] == 1 and summary["data"]["k_shot"] == 0
