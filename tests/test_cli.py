"""The CLI end to end: outputs of a run, stage reuse on rerun, one-line errors with exit 2."""
import json
import os
import subprocess
import sys

import pytest
from test_stage_plan import assert_plan_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"


def _cli(*args, timeout=600):
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return subprocess.run([sys.executable, "-m", "clue_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_tiny_quickstart_outputs_and_rerun_reuses_every_stage(tmp_path):
    workdir = tmp_path / "qs"
    first = _cli("--config", TINY, "--workdir", str(workdir))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Cloze exact match" in first.stdout and "QA exact match" in first.stdout
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        assert (workdir / name).exists(), name
    assert any(f.startswith("events") for _, _, files in os.walk(workdir / "tensorboard") for f in files)
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"base_small", "plain_s0", "attention_s0", "contrast_s0"} <= set(summary["models"])
    qa = summary["models"]["plain_s0"]["qa"]
    assert {"birth_date", "birth_city", "university", "major", "company", "all"} <= set(qa)
    assert summary["distance_from_name"]["company"] > summary["distance_from_name"]["birth_date"]
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} >= {"pretrain_small", "cpt_small_plain_s0"}
    run = json.loads((workdir / "config.json").read_text())["run"]
    assert summary["run"] == run and {m["run"] for m in metrics} == {run["id"]}
    assert "stage 1/" in first.stderr and assert_plan_kept(first.stderr, summary) == len(summary["stages"])

    second = _cli("--config", TINY, "--workdir", str(workdir))
    assert second.returncode == 0, second.stderr[-3000:]
    summary2 = json.loads((workdir / "summary.json").read_text())
    assert summary2["stages_ran"] == []
    assert assert_plan_kept(second.stderr, summary2) == len(summary["stages"])
    assert "pretrain_large" in summary2["stages_reused"] and "cpt_small_contrast_s0" in summary2["stages_reused"]
    assert summary2["models"] == summary["models"]
    again = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, metrics))  # a rerun logs nothing twice


def test_print_config_prints_the_resolved_config_and_touches_no_workdir(tmp_path):
    proc = _cli("--config", TINY, "--workdir", str(tmp_path / "w"), "--print_config", "--config.cpt.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads(proc.stdout)
    assert config["cpt"]["steps"] == 3 and config["logging"]["trackers"] == ["tensorboard"]
    assert not (tmp_path / "w").exists()
    line = _one_line_error(_cli("--config", TINY, "--print_config", "--config.logging.trackers=('tensorboard','mlflow')"))
    assert line == "error: --config.logging.trackers=('tensorboard', 'mlflow'): unknown tracker 'mlflow'; known: tensorboard, wandb"


def test_wrong_config_key_lists_valid_keys(tmp_path):
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(tmp_path / "w"), "--config.cpt.lrr=0.1"))
    assert "cpt.lrr" in line and "cpt.lr" in line


def test_missing_workdir_parent(tmp_path):
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(tmp_path / "no" / "such" / "dir")))
    assert str(tmp_path / "no" / "such") in line


def test_malformed_corpus_names_file_and_line(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "Ada was born in 1815."}\n{"text": oops}\n')
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "When was Ada born?", "answer": "1815"}\n')
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(tmp_path / "w"), "--config.data.source=corpus",
                                f"--config.data.corpus={bad}", f"--config.data.qa_file={qa}"))
    assert f"{bad}:2" in line


def test_not_a_tokenizer_directory(tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    line = _one_line_error(_cli("--config", TINY, "--workdir", str(tmp_path / "w"), f"--config.tokenizer.path={empty}"))
    assert "tokenizer" in line and str(empty) in line
