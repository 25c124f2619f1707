"""The clue-dropout replication's tiny variant end to end through the CLI: grid on dev people, four arms x two
students x seeds, replication.md with tables, chosen settings, clue analysis and verdict, and the plot."""
import json
import os
import subprocess
import sys

from clue_jax.pipelines import replicate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("plain", "random", "attention", "contrast")


def test_tiny_replication_end_to_end(tmp_path):
    workdir = tmp_path / "rep"
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/replicate_bios.py:tiny",
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())

    # The grid ran on dev people with the small student: alpha alone for random, alpha x beta otherwise.
    assert [set(t) for t in summary["grid"]["random"]] == [{"alpha", "dev_em"}]
    assert len(summary["grid"]["contrast"]) == len(summary["grid"]["attention"]) == 2
    for arm in ("random", "attention", "contrast"):
        chosen = summary["chosen"][arm]
        best = max(summary["grid"][arm], key=lambda t: t["dev_em"])
        assert chosen == {k: v for k, v in best.items() if k != "dev_em"}
    for student in ("small", "large"):
        arms = summary["results"][student]
        assert set(arms) == {"base", *ARMS}
        for arm in ARMS:
            assert len(arms[arm]) == 2  # seeds (0, 1)
            for run in arms[arm]:
                em = run[summary["primary"]]["all"]["exact_match"]
                assert 0.0 <= em <= 1.0
    # Two seeds of a dropout arm draw different dropout, so they train differently.
    c0, c1 = summary["results"]["small"]["contrast"]
    assert c0["train"]["final_loss"] != c1["train"]["final_loss"]

    report = (workdir / "replication.md").read_text()
    assert report.startswith("# Clue dropout on the biography world")
    assert "Protocol: every arm trains 4 steps of 8 biographies" in report
    assert f"## {summary['primary']}: exact match, small student" in report
    assert "## Dropout settings chosen on dev people" in report and "## Which tokens are clues" in report
    assert "Measured: small student" in report and "large student" in report
    assert (workdir / "em_vs_distance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table is what the pipeline printed, once.
    assert proc.stdout.count("# Clue dropout on the biography world") == 1


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
    """Your own documents and QA pairs, no dev people: the grid off, alpha/beta given, QA is the reported probe."""
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
    assert summary["primary"] == "qa" and not any(summary["grid"].values())
    assert set(summary["results"]["small"]) == {"base", *ARMS}
    assert "## qa: exact match, small student" in (tmp_path / "rep" / "replication.md").read_text()


def _runs(far_em_per_seed):
    """Synthetic evaluation results: every attribute of a run scores that seed's value."""
    attrs = ("birth_date", "university", "major", "company")
    return [{"cloze": {a: {"exact_match": v} for a in attrs + ("all",)}} for v in far_em_per_seed]


def test_verdict_is_seed_paired_and_respects_the_spread():
    summary = {
        "primary": "cloze",
        "distance_from_name": {"birth_date": 4, "university": 29, "major": 42, "company": 55},
        "results": {"small": {
            "base": _runs([0.0, 0.0, 0.0]),
            "contrast": _runs([0.50, 0.30, 0.40]),
            "plain": _runs([0.40, 0.20, 0.30]),  # behind contrast by exactly 0.1 on every seed
            "attention": _runs([0.60, 0.20, 0.42]),  # differences -0.1, +0.1, -0.02: inside their spread
        }},
    }
    text = replicate.verdict(summary)
    assert "contrast 0.400" in text
    assert "vs plain (0.300): +0.100 ± 0.000, contrast ahead (beyond the seed spread)" in text
    assert "vs attention (0.407): -0.007 ± 0.101, no clear difference (within the seed spread)" in text
    one_seed = {**summary, "results": {"small": {k: v[:1] for k, v in summary["results"]["small"].items()}}}
    assert "contrast behind (one seed)" in replicate.verdict(one_seed)


def test_protocol_note_counts_views_over_the_test_people_only():
    from configs.replicate_bios import get_config

    config = get_config()
    test_people = config.world.num_new - config.data.num_dev
    expected = config.cpt.steps * config.cpt.batch_size / test_people
    assert f"about {expected:.0f} times" in replicate.protocol_note(config)
