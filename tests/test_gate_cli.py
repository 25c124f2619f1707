"""`python -m clue_jax.gate` on tiny teachers the test saves itself: gate.json, the views, bad input."""
import json
import shutil
import sys

import pytest
from flax import nnx

from clue_jax import gate
from clue_jax.data import tokenizer as tokenizer_lib
from clue_jax.models import config as model_config
from clue_jax.models import factory
from clue_jax.models.causal_lm import CausalLM

DOCS = ["Ann Lee was born in Paris. She works at Acme.", "Bo Chen was born in Lima. He works at Zenith.",
        "Cy Diaz was born in Oslo. She works at Orbit.", "Di Egan was born in Rome. He works at Nimbus.",
        "Ed Fox was born in Kyiv. He works at Quartz."]
QA = [{"question": f"Where does {d.split(' was')[0]} work?", "answer": d.split("works at ")[1].rstrip(".")}
      for d in DOCS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    tok = tokenizer_lib.train_bpe_tokenizer(DOCS * 4, 300, root / "tokenizer")
    dirs = {}
    # One architecture for both sizes: each new one costs seconds of compilation, and the plumbing is the same.
    cfg = model_config.gpt2(vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=32)
    for offset, size in enumerate(("small", "large")):
        for seed in (0, 1):
            d = str(root / f"{size}{seed}")
            model = CausalLM(cfg, rngs=nnx.Rngs(10 * offset + seed))  # eager: no compilation per model
            factory.save_params(model, cfg, d)
            dirs.setdefault(size, []).append(d)
    (root / "corpus.txt").write_text("\n\n".join(DOCS) + "\n")
    (root / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QA))
    return {"root": root, "tokenizer": str(root / "tokenizer"), **dirs,
            "corpus": str(root / "corpus.txt"), "qa": str(root / "qa.jsonl")}


def _args(files, workdir, small=None, large=None, **extra):
    argv = ["--workdir", str(workdir), "--corpus", files["corpus"], "--qa", files["qa"],
            "--tokenizer", files["tokenizer"], "--k", "4"]
    for d in small or files["small"]:
        argv += ["--small", d]
    for d in large or files["large"]:
        argv += ["--large", d]
    for k, v in extra.items():
        argv += [f"--{k}", v]
    return argv


def _run(monkeypatch, capsys, argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["clue_jax.gate", *argv])
    with pytest.raises(SystemExit) as stop:
        gate.run()
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_gate_on_two_seeds_per_size_writes_the_verdict_the_statistics_and_views(files, tmp_path, monkeypatch,
                                                                                 capsys):
    code, out, err = _run(monkeypatch, capsys, _args(files, tmp_path / "w"))
    assert code == 0, err
    record = json.loads((tmp_path / "w" / "gate.json").read_text())
    assert record["passed"] in (True, False) and record["targets"] == "question words"
    assert record["documents"]["with_targets"] == 5 and record["documents"]["with_far_query"] == 5
    for name in ("top_k_share", "mean_rank", "far_query"):
        s = record["statistics"][name]
        assert len(s["cross"]) == 4 and len(s["null"]) == 4 and 0 < s["p"] <= 1
        assert len(record["control"][name]["values"]) == 2
    assert record["pairs"]["null"] == [["small0", "small1"], ["small1", "small0"], ["large0", "large1"],
                                       ["large1", "large0"]]
    assert 0 < record["statistics"]["top_k_share"]["chance"] < 1
    lines = out.splitlines()
    assert lines[0].startswith("teacher gate: 2 large x 2 small teachers, 5 of 5 documents")
    assert lines[4].startswith("passed: ") and "same-size null: " in lines[1]
    view = (tmp_path / "w" / "views" / "doc_0.html").read_text()
    assert view.count('class="t m"') >= 2  # "Ann" and "Lee" boxed


def test_one_seed_per_size_has_no_null(files, tmp_path, monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, _args(files, tmp_path, files["small"][:1], files["large"][:1],
                                                     views="0"))
    record = json.loads((tmp_path / "gate.json").read_text())
    assert code == 0 and record["passed"] is None and "no null" in record["reason"]
    assert out.splitlines()[4].startswith("passed: null (one seed per size")


def _bad(files, tmp_path, case):
    if case == "missing":
        return _args(files, tmp_path / "w", small=[str(tmp_path / "nowhere")]), "--small"
    if case == "not_a_model":
        (tmp_path / "empty").mkdir()
        return _args(files, tmp_path / "w", large=[str(tmp_path / "empty")]), "not a model directory"
    if case == "tokenizers_differ":
        other = tmp_path / "other_large"
        shutil.copytree(files["large"][0], other)
        tokenizer_lib.train_bpe_tokenizer(["something else entirely"] * 4, 270, other)
        return _args(files, tmp_path / "w", large=[str(other)]), "different tokenizers"
    (tmp_path / "empty.txt").write_text("\n\n")
    return _args(files, tmp_path / "w", corpus=str(tmp_path / "empty.txt")), "empty corpus"


@pytest.mark.parametrize("case", ["missing", "not_a_model", "tokenizers_differ", "empty_corpus"])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, monkeypatch, capsys, case):
    argv, words = _bad(files, tmp_path, case)
    code, out, err = _run(monkeypatch, capsys, argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "w" / "gate.json").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as stop:
        gate.main(["--help"])
    assert stop.value.code == 0 and "--small" in capsys.readouterr().out
