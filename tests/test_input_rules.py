"""What a run accepts as input, refused in one line before anything is written: QA answers, corpus documents,
sequences and repeated flags, numeric limits, dropout settings and the config's name."""
import copy
import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from clue_jax import config_check, configs
from clue_jax.data import bios, corpus
from clue_jax.errors import UserInputError
from clue_jax.eval import metrics, qa_eval, qa_file
from clue_jax.pipelines.validate import check_config
from test_validation import ROOT, TINY, _cli, _config, _one_line_error, _user_files


# ------------------------------------------------------------------ QA answers
@pytest.mark.parametrize("answer", ["", "the", ".", " A  ", "::::"])
def test_answer_that_normalises_to_nothing_is_refused_naming_file_and_line(tmp_path, answer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Q1?", "answer": "Acme"}) + "\n"
                    + json.dumps({"question": "Q2?", "answer": answer}) + "\n")
    with pytest.raises(UserInputError) as err:
        qa_file.read_qa_file(path)
    assert str(err.value).startswith(f"{path}:2: answer {answer!r} normalises to nothing")


def test_cli_empty_answer_is_refused_before_the_workdir_is_made(tmp_path):
    docs, qa = _user_files(tmp_path, qa='{"question": "Where does Ann Lee work?", "answer": "the"}\n')
    workdir = tmp_path / "w"
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(workdir), f"--config.data.corpus={docs}",
                                f"--config.data.qa_file={qa}"))
    assert line.startswith(f"error: {qa}:1: answer 'the' normalises to nothing") and \
        line.endswith("(--config.data.qa_file)")
    assert not workdir.exists()


def test_world_answers_all_have_a_word_and_an_empty_prediction_scores_nothing():
    world = bios.build_world(bios.WorldConfig(num_background=300, num_new=100, zipf_exponent=0.0))
    items = [q for p in world.people for q in bios.qa_items(p) + bios.cloze_items(p)]
    assert all(qa_file.answer_problem(q.answer) is None for q in items)
    assert max(metrics.exact_match("::::", q.answer) + metrics.token_f1("::::", q.answer) for q in items) == 0.0
    with pytest.raises(ValueError, match="normalises to nothing"):
        qa_eval.Probe("Where?", "The.")


# ------------------------------------------------------------------ corpus documents
def test_byte_order_mark_is_dropped_alike_in_txt_and_jsonl(tmp_path):
    txt, jsonl = tmp_path / "c.txt", tmp_path / "c.jsonl"
    txt.write_bytes("\ufeffAnn Lee works at Acme.\n\nBo Chan.\n".encode())
    jsonl.write_bytes(("\ufeff" + json.dumps({"text": "Ann Lee works at Acme."}) + "\n"
                       + json.dumps({"text": "Bo Chan."}) + "\n").encode())
    assert corpus.corpus_documents(txt) == [(1, "Ann Lee works at Acme."), (3, "Bo Chan.")]
    assert corpus.corpus_documents(jsonl) == [(1, "Ann Lee works at Acme."), (2, "Bo Chan.")]


@pytest.mark.parametrize("name, content, line, rule", [
    ("c.jsonl", '{"text": "a"}\n{"text": ""}\n', 2, "empty document"),
    ("c.jsonl", '{"text": "a"}\n\n{"text": " \\n\\t"}\n', 3, "empty document"),
    ("c.jsonl", '{"text": "a\\ufeffb"}\n', 1, "a byte-order mark (U+FEFF) inside the document"),
    ("c.txt", "a\n\n\ufeffb\n", 3, "a byte-order mark (U+FEFF) inside the document"),
])
def test_document_breaking_the_rule_names_file_and_line(tmp_path, name, content, line, rule):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserInputError) as err:
        corpus.corpus_documents(path)
    assert str(err.value).startswith(f"{path}:{line}: {rule}")


def test_cli_empty_document_is_refused_and_an_existing_workdir_keeps_no_lock_or_running_config(tmp_path):
    docs, qa = _user_files(tmp_path, docs=("Ann Lee works at Acme Corp.", ""))
    workdir = tmp_path / "w"
    workdir.mkdir()
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(workdir), f"--config.data.corpus={docs}",
                                f"--config.data.qa_file={qa}"))
    assert line.startswith(f"error: {docs}:2: empty document") and line.endswith("(--config.data.corpus)")
    assert os.listdir(workdir) == []


# ------------------------------------------------------------------ sequences and repeated flags
@pytest.mark.parametrize("config_name, key, value", [
    ("quickstart", "seeds", (0, 0)), ("quickstart", "clues.arms", ("plain", "contrast", "plain")),
    ("replicate_bios", "protocol.names", ("paper", "paper")), ("replicate_bios", "grid.betas", (0.01, 0.01)),
    ("mcl_tiny", "arms", ("electra", "electra")), ("extraction", "sweep.steps", (2, 2)),
])
def test_repeated_item_in_a_sequence_is_refused(config_name, key, value):
    config = _config(config_name)
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(UserInputError, match=rf"^--config\.{key}=.*: {value[-1]!r} is given twice; the items must "
                                             "be distinct"):
        check_config(config)


def test_cli_duplicate_seeds_and_any_flag_given_twice_are_refused():
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w", "--config.seeds=(0,0)"))
    assert line.startswith("error: --config.seeds=(0, 0): 0 is given twice")
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w",
                                "--config.clues.arms=('plain','contrast')", "--config.clues.arms=('plain',)"))
    assert line == "error: --config.clues.arms is given twice: give each flag once (a tuple is one value: " \
                   "--config.clues.arms=\"(a,b)\")"


@pytest.mark.parametrize("argv, twice", [
    (["--config.cpt.lr=1", "--config.cpt.lr=2"], "config.cpt.lr"),
    (["--config.seeds=0", "--config.seeds", "1"], "config.seeds"),
    (["--config.eval.cloze", "--noconfig.eval.cloze"], "config.eval.cloze"),
    (["--workdir=a", "--workdir", "b"], "workdir"),
])
def test_every_flag_given_twice_is_refused(argv, twice):
    with pytest.raises(UserInputError, match=rf"^--{twice} is given twice"):
        config_check.given_flags(["main", "--config", TINY, *argv])
    assert config_check.given_flags(["main", "--config", TINY, argv[0], "--config.seed", "-1"])[-1] == "config.seed"


# ------------------------------------------------------------------ numeric limits
def _numbers(config):
    return [(k, v) for k, v in config_check.flat_items(config) if isinstance(v, (int, float)) and
            not isinstance(v, bool)]


@pytest.mark.parametrize("name", configs.names())
def test_every_number_of_every_shipped_config_refuses_inf_nan_and_int32_overflow(name):
    config = configs.get_config(name, "tiny")
    for key, value in _numbers(config):
        for bad in ((float("inf"), float("nan")) if isinstance(value, float) else (2**31, 99999999999999999999)):
            changed = copy.deepcopy(config)
            section, _, leaf = key.rpartition(".")
            (changed[section] if section else changed)[leaf] = bad
            with pytest.raises(UserInputError, match=rf"--config\.{key}="):
                check_config(changed)


def test_cli_overflowing_steps_infinite_lr_and_too_many_new_tokens_are_refused():
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w",
                                "--config.cpt.steps=99999999999999999999", "--config.pretrain.lr=inf",
                                "--config.cpt.lr=nan"))
    assert set(line[len("error: "):].split("; ")) == {
        "--config.pretrain.lr=inf: must be finite (a number > 0)", "--config.cpt.lr=nan: must be finite (a number > 0)",
        "--config.cpt.steps=99999999999999999999: must be at most 2147483647 (JAX counts in int32)"}
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w", "--config.eval.max_new_tokens=256"))
    assert line == ("error: --config.eval.max_new_tokens=256 leaves no room for a prompt in models.large's "
                    "max_len=256 positions: at most 255, less the prompt's tokens")


def test_prompt_and_new_tokens_must_fit_a_loaded_models_positions():
    model = type("Model", (), {"cfg": ml_collections.ConfigDict({"max_len": 64})})()
    qa_eval.check_positions(model, 40, 24)
    with pytest.raises(UserInputError, match=r"max_new_tokens=25 after prompts of up to 40 tokens passes the "
                                             r"model's max_len=64 positions: lower .* to at most 24"):
        qa_eval.check_positions(model, 40, 25)


# ------------------------------------------------------------------ clues.alpha / beta against clues.chosen
def test_alpha_beta_given_on_the_command_line_replace_every_arms_chosen_setting(caplog):
    config = _config()
    config.clues.alpha, config.clues.beta = 0.3, 0.05
    check_config(config)  # not given on the command line: the per-arm choice stands
    assert config.clues.chosen.contrast.to_dict() == {"alpha": 0.7, "beta": 0.005}
    with caplog.at_level(logging.INFO, logger="clue_jax"):
        check_config(config, ["clues.alpha", "clues.beta"])
    assert {arm: s.to_dict() for arm, s in config.clues.chosen.items()} == {
        "attention": {"alpha": 0.3, "beta": 0.05}, "contrast": {"alpha": 0.3, "beta": 0.05}}
    assert "--config.clues.beta=0.05 replaces clues.chosen's beta for attention, contrast" in caplog.text


def test_cli_alpha_given_twice_over_or_where_the_grid_chooses_is_refused(tmp_path):
    proc = _cli("--config", TINY, "--workdir", str(tmp_path / "w"), "--config.clues.alpha=0.3",
                "--config.clues.beta=0.05", f"--config.data.corpus={tmp_path / 'missing.jsonl'}",
                f"--config.data.qa_file={tmp_path / 'missing.jsonl'}")  # stops at the files, after the settings
    assert "cannot read" in _one_line_error(proc)
    assert "--config.clues.alpha=0.3 replaces clues.chosen's alpha for attention, contrast" in proc.stderr
    assert "--config.clues.beta=0.05 replaces clues.chosen's beta for attention, contrast" in proc.stderr
    line = _one_line_error(_cli("--config", TINY, "--workdir", "/nonexistent/w", "--config.clues.alpha=0.3",
                                "--config.clues.chosen.contrast.alpha=0.6"))
    assert line.startswith("error: --config.clues.alpha and --config.clues.chosen.contrast.alpha are both given")
    config = _config()
    config.clues.arms = ("plain", "contrast")
    with pytest.raises(UserInputError, match=r"--config.clues.chosen.attention.alpha is for an arm not in "
                                             r"clues.arms=\('plain', 'contrast'\)"):
        check_config(config, ["clues.chosen.attention.alpha"])
    config = _config("replicate_bios")
    with pytest.raises(UserInputError, match=r"--config.clues.beta is not used while grid.enabled=True"):
        check_config(config, ["clues.beta"])
    config.grid.enabled, config.data.num_dev = False, 3
    check_config(config, ["clues.beta"])
    config.clues.arms = ("plain", "random")
    with pytest.raises(UserInputError, match=r"--config.clues.beta is read by no arm of clues.arms=\('plain', "
                                             r"'random'\)"):
        check_config(config, ["clues.beta"])
    with pytest.raises(UserInputError, match=r"--config.clues.chosen.contrast.alpha is not read by the replicate"):
        check_config(config, ["clues.chosen.contrast.alpha"])


# ------------------------------------------------------------------ naming a config; the validator's imports
def test_cli_config_path_that_does_not_exist_says_how_to_name_a_shipped_config(tmp_path):
    env = dict(os.environ, CI="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "clue_jax.main", "--config", "quickstart.py:tiny", "--workdir",
                           str(tmp_path / "w")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    line = _one_line_error(proc)
    assert line.startswith(f"error: no config file 'quickstart.py' (from {tmp_path}); a shipped config is named "
                           "without a path or .py, e.g. --config quickstart:tiny (shipped: ")


def test_validator_and_choices_import_no_jax():
    code = ("import sys, clue_jax.pipelines.validate, clue_jax.choices; "
            "heavy = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
