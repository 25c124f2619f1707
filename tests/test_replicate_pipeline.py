"""The clue-dropout replication's tiny variant end to end through the CLI: grid on dev people, four arms x two
students x seeds under both protocols, replication.md with the gate first, tables, curves, bootstrap comparisons,
chosen settings and the clue analysis, and the plots; the protocols' step counts and the settings rule."""
import json
import os
import subprocess
import sys

from clue_jax.pipelines import replicate
from test_stage_plan import assert_plan_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("plain", "random", "attention", "contrast", "rate_matched", "shuffled")


def test_tiny_replication_end_to_end(tmp_path):
    workdir = tmp_path / "rep"
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/replicate_bios.py:tiny",
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert_plan_kept(proc.stderr, summary)  # the grid, protocols, students and seeds counted from the config

    # The gate: both teachers per attribute on background people, the far clue with its interval.
    g = summary["teacher_gate"]
    assert set(g["capability"]["per_attribute"]["company"]) == {"small", "large"}
    assert g["params"]["large"] > g["params"]["small"]
    assert {"low", "high", "n"} <= set(g["far_clue"]["excess"]) and isinstance(g["passed"], bool)
    assert summary["token_lengths"]["name"] > 0 and summary["token_lengths"]["company"] > 0

    # The grid on dev people, per student: plain, random over alphas, alpha x beta otherwise; the rule's winner.
    grid = summary["grid"]["small"]
    assert len(grid["plain"]) == 1 and [set(t) for t in grid["random"]] == [{"alpha", "dev_em"}]
    assert len(grid["contrast"]) == len(grid["attention"]) == 2
    chosen = summary["chosen"]["small"]
    for arm in ("random", "attention", "contrast"):
        assert chosen[arm] == replicate.choose(grid[arm], tuple(k for k in grid[arm][0] if k != "dev_em"))
    assert chosen["rate_matched"] == chosen["shuffled"] == chosen["contrast"]

    # Every protocol, every arm, with EM against steps and the values' NLL; paper: dropout arms train longer;
    # long: every arm, plain included, the paper's dropout-arm steps.
    paper, equal, long = (summary["protocols"][p] for p in ("paper", "equal_compute", "long"))
    assert paper["steps"]["contrast"] > paper["steps"]["plain"] == equal["steps"]["contrast"]
    assert long["steps"]["plain"] == long["steps"]["contrast"] == paper["steps"]["contrast"]
    assert long["results"]["small"]["plain"][0]["train"]["steps"] == paper["steps"]["contrast"]
    for p in (paper, equal, long):
        arms = p["results"]["small"]
        assert set(arms) == {"base", *ARMS}
        for arm in ARMS:
            assert len(arms[arm]) == 2  # seeds (0, 1)
            for run in arms[arm]:
                assert 0.0 <= run[summary["primary"]]["all"]["exact_match"] <= 1.0
                assert run["value_nll"]["company"]["nll"] > 0
                assert [pt["step"] for pt in run["train"]["curve"]][-1] == run["train"]["steps"]
        assert set(p["comparisons"]["small"]) == set(ARMS) - {"contrast"}
        assert {"cloze", "qa", "value_nll"} == set(p["comparisons"]["small"]["plain"])
    assert paper["results"]["small"]["contrast"][0]["train"]["steps"] == paper["steps"]["contrast"]
    # plain is one run under both protocols; two seeds of a dropout arm draw different dropout
    assert paper["results"]["small"]["plain"][0]["train"] == equal["results"]["small"]["plain"][0]["train"]
    c0, c1 = paper["results"]["small"]["contrast"]
    assert c0["train"]["final_loss"] != c1["train"]["final_loss"]

    report = (workdir / "replication.md").read_text()
    assert report.startswith("# Clue dropout on the biography world\n\n## Teacher gate\n\nTeacher gate ")
    assert report.index("Teacher gate") < report.index("### cloze exact match, small student")
    assert "## the paper's protocol" in report and "## equal compute" in report
    assert "### EM (all attributes) against steps, small student" in report
    assert "### NLL of the values in the intact biographies" in report
    assert "- small: contrast - shuffled on the far attributes: cloze " in report
    assert "## Settings chosen on dev people" in report and "## Which tokens are clues" in report
    for png in ("em_vs_distance.png", "em_vs_steps.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.count("# Clue dropout on the biography world") == 1  # the report, printed once


def test_grid_on_a_user_corpus_is_a_one_line_error(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "Ann Lee was born on May 1, 1990."}\n')
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/replicate_bios.py:tiny",
           "--workdir", str(tmp_path / "rep"), "--config.data.source=corpus", f"--config.data.corpus={corpus}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "grid.enabled needs dev people" in proc.stderr and "--config.grid.enabled=False" in proc.stderr
    assert not (tmp_path / "rep" / "stages").exists()  # refused before any work


def test_tiny_replication_on_a_user_corpus(tmp_path):
    """Your own documents and QA pairs, no dev people: the grid off, alpha/beta given; the cloze cut from each
    answer's sentence is the reported probe, QA and the answers' NLL beside it."""
    from clue_jax.data import bios

    world = bios.build_world(bios.WorldConfig(seed=5, num_background=4, num_new=6))
    docs, qa = tmp_path / "docs.jsonl", tmp_path / "qa.jsonl"
    docs.write_text("".join(json.dumps({"text": bios.paper_bio(p)}) + "\n" for p in world.new))
    qa.write_text("".join(json.dumps({"question": q.question, "answer": q.answer, "attribute": q.attribute}) + "\n"
                          for p in world.new for q in bios.qa_items(p)))
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/replicate_bios.py:tiny",
           "--workdir", str(tmp_path / "rep"), "--config.data.source=corpus", f"--config.data.corpus={docs}",
           f"--config.data.qa_file={qa}", "--config.grid.enabled=False", "--config.clues.alpha=0.6",
           "--config.clues.beta=0.01", "--config.seeds=(0,)", "--config.students=('small',)"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, CI="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["primary"] == "cloze" and not any(summary["grid"].values())
    base = summary["protocols"]["paper"]["results"]["small"]["base"][0]
    assert {"qa", "cloze", "value_nll"} <= set(base) and base["value_nll"]["company"]["nll"] > 0
    assert summary["chosen"]["small"]["contrast"] == {"alpha": 0.6, "beta": 0.01}
    assert set(summary["protocols"]["paper"]["results"]["small"]) == {"base", *ARMS}
    assert summary["teacher_gate"]["far_clue"]["passed"] is None  # a corpus has no known names
    report = (tmp_path / "rep" / "replication.md").read_text()
    assert "### cloze exact match, small student" in report and "### QA exact match, small student" in report


def test_protocol_note_counts_views_over_the_test_people_only():
    from clue_jax.pipelines.replicate_report import protocol_note
    from configs.replicate_bios import get_config

    config = get_config()
    note = protocol_note(config, "paper", {"plain": 44, "contrast": 482}, 70)
    assert "plain trains 44 steps of 16 (10 views of each of the 70 documents)" in note
    assert "a dropout arm trains 482 steps" in note and "intact about 10.0 times" in note


def test_large_student_runs_with_its_own_grid_free_settings(tmp_path):
    """The large student (the large teacher continually pre-trained) through the same path, cut to one arm pair."""
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/replicate_bios.py:tiny",
           "--workdir", str(tmp_path / "rep"), "--config.students=('large',)", "--config.grid.enabled=False",
           "--config.clues.arms=('plain','contrast')", "--config.protocol.names=('paper',)", "--config.seeds=(0,)",
           "--config.clues.render_examples=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    arms = summary["protocols"]["paper"]["results"]["large"]
    assert set(arms) == {"base", "plain", "contrast"}
    assert set(summary["protocols"]["paper"]["comparisons"]) == {"large"}
    assert "cpt_large_contrast_s0" in summary["stages_ran"]


def test_protocol_step_counts():
    from clue_jax.pipelines.protocol import arm_settings, protocol_steps
    from configs.replicate_bios import get_config

    # the paper: 10 epochs over 70 documents; a dropout arm's data is 1 original + 10 copies of each
    assert protocol_steps("paper", "plain", 70, 10, 16, 10) == 44  # ceil(700 / 16)
    assert protocol_steps("paper", "contrast", 70, 10, 16, 10) == 482  # ceil(7700 / 16): 11x the rows
    assert protocol_steps("equal_compute", "contrast", 70, 10, 16, 10) == 44
    config = get_config()
    s = arm_settings(config, "paper", "contrast", 70)
    assert config.protocol.epochs == 20  # within the paper's 10-30
    assert s["mode"] == "fixed_copies" and s["train"]["steps"] == 963  # ceil(20 * 770 / 16)
    assert s["train"]["warmup_steps"] == 96 and s["train"]["eval_every"] == 241  # 10% warm-up, 4 curve points
    eq = arm_settings(config, "equal_compute", "shuffled", 70)
    assert eq["mode"] == "cached" and eq["train"]["steps"] == 88
    assert arm_settings(config, "equal_compute", "plain", 70) == arm_settings(config, "paper", "plain", 70)
    # long: every arm, plain included, the paper's dropout-arm steps, dropout drawn fresh
    for arm in ("plain", "contrast"):
        assert protocol_steps("long", arm, 70, 10, 16, 10) == 482
    assert arm_settings(config, "long", "contrast", 70)["mode"] == "cached"
    assert arm_settings(config, "long", "plain", 70)["train"]["steps"] == 963


def test_setting_rule_prefers_higher_em_then_the_milder_point():
    trials = [{"alpha": 0.6, "beta": 0.03, "dev_em": 0.5}, {"alpha": 0.7, "beta": 0.005, "dev_em": 0.5},
              {"alpha": 0.6, "beta": 0.05, "dev_em": 0.5}, {"alpha": 0.7, "beta": 0.05, "dev_em": 0.4}]
    assert replicate.choose(trials, ("alpha", "beta")) == {"alpha": 0.6, "beta": 0.03}
    assert replicate.choose(trials[3:], ("alpha", "beta")) == {"alpha": 0.7, "beta": 0.05}


def test_evaluation_entries_one_per_model_at_its_training_step(tmp_path):
    """Each seed of an arm is its own entry, with its `train` record, so its scalars land at the step it was
    trained to; a base model is one entry at step 0."""
    from clue_jax.train import logging_utils

    runs = [{"train": {"steps": 7}, "cloze": {"all": {"exact_match": 0.5}}, "per_person": {"all": [1.0]}},
            {"train": {"steps": 7}, "cloze": {"all": {"exact_match": 0.25}}, "per_person": {"all": [0.0]}}]
    protocols = {"paper": {"results": {"small": {"base": [{"cloze": {"all": {"exact_match": 0.0}}}], "plain": runs}}}}
    entries = replicate.eval_entries(protocols, [0, 3])
    assert sorted(entries) == ["paper_small_base", "paper_small_plain_s0", "paper_small_plain_s3"]
    assert "per_person" not in entries["paper_small_plain_s3"]
    logging_utils.write_eval_scalars(str(tmp_path), entries)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {line["stage"]: line["step"] for line in lines}
    assert steps == {"eval/paper_small_base": 0, "eval/paper_small_plain_s0": 7, "eval/paper_small_plain_s3": 7}
    assert {line["stage"]: line["eval/cloze/all/exact_match"] for line in lines}["eval/paper_small_plain_s3"] == 0.25
