"""The MCL pipeline's tiny variant end to end through the CLI, on 8 fake CPU devices."""

import json
import os
import subprocess
import sys

from test_stage_plan import assert_plan_kept

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_pipeline_end_to_end(tmp_path):
    workdir = tmp_path / "mcl"
    env = dict(os.environ)
    # Tests value compile time over run time: the tiny variant is compile-bound.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", "configs/mcl_tiny.py:tiny", "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((workdir / "summary.json").read_text())
    assert_plan_kept(proc.stderr, summary)  # the greedy soup's one candidate is the uniform soup: counted out
    for key in ("arms", "soups", "curves", "probes", "claims", "runtime", "setup", "tasks"):
        assert key in summary
    assert summary["tasks"] == ["bios_qa", "bios_pair"]
    for arm in ("electra", "all3", "mcl"):
        res = summary["arms"][arm]["0"]
        assert set(res["tasks"]) == {"bios_qa", "bios_pair"}
        qa = res["tasks"]["bios_qa"]["test"]
        assert 0.0 <= qa["exact_match"] <= qa["f1"] <= 1.0 and 0.0 <= qa["no_ans_accuracy"] <= 1.0
        assert 0.0 <= res["tasks"]["bios_pair"]["test"]["accuracy"] <= 1.0
        probes = summary["probes"][arm]["0"]
        assert [p["step"] for p in probes] == [2, 4]  # every probe_every steps
        for course in ("rtd", "std", "itd"):
            assert 0.0 < probes[-1][f"{course}/replaced_share"] < 1.0
    # the references: a random-init pair fine-tuned, and every D's detection AUC on one fixed corruption
    assert set(summary["arms"]["random"]["0"]["tasks"]) == {"bios_qa", "bios_pair"}
    assert set(summary["intrinsic"]) == {"electra", "all3", "mcl", "random"}
    assert set(summary["intrinsic"]["mcl"]["0"]) == {"2", "4"} and set(summary["intrinsic"]["random"]["0"]) == {"0"}
    assert all(0.0 <= v <= 1.0 for per in summary["intrinsic"].values() for v in per["0"].values())
    assert summary["setup"]["segments"] == 2 and 0.0 <= summary["setup"]["itd_capped_share"] <= 1.0
    assert summary["probes"]["mcl"]["0"] and summary["setup"]["objective"]["sampling"] == "all"
    soup = summary["soups"]["0"]
    assert set(soup["ingredients"]) == {"re_rtd", "re_std"}
    assert {"uniform", "greedy"} <= set(soup) and soup["greedy"]["chosen"]
    assert set(summary["curves"]["mcl"]["0"]) == {"2", "4"}  # an intermediate snapshot and the final step
    assert set(summary["claims"]["courses_vs_electra"]) == {"all3", "mcl"}
    # The downstream gate (ELECTRA against random init, per question), D rows per step beside every arm.
    gate = summary["gate"]
    assert isinstance(gate["passed"], bool) and gate["questions"] == summary["setup"]["task_sizes"]["bios_qa"]["test"]
    assert gate["difference"]["low"] <= gate["difference"]["mean"] <= gate["difference"]["high"]
    assert {a: r["relative_to_batch"] for a, r in summary["discriminator_rows"].items()} == {
        "electra": 1.0, "all3": 3.0, "mcl": 6.0}
    assert "compute_matched" not in summary and "per_question_f1" not in json.dumps(summary)
    assert 0.0 <= summary["arms"]["electra"]["0"]["tasks"]["bios_qa"]["test"]["answerable_f1"] <= 1.0
    assert set(summary["claims"]["vs_random_init"]) == {"electra", "all3", "mcl"}
    assert set(summary["claims"]["auc_vs_electra"]["mcl"]) == {"2", "4"}
    assert "uniform_reaches_mean" in summary["claims"]["soups"]["0"]

    report = (workdir / "mcl_report.md").read_text()
    assert report.index("## Gate: does pre-training help downstream?") < report.index("## Results")
    assert "answerable-only F1" in report and "(6.0x batch)" in report
    assert "## Claims, as measured" in report and "ELECTRA at equal steps (4)" in report
    assert "uniform soup" in report and "mean of its ingredients" in report
    assert "## Detection AUC on a fixed reference corruption" in report and "HasAns F1" in report
    assert "the random-init reference downstream" in report and "Generator check" in report
    for png in ("replaced_share.png", "score_vs_steps.png"):
        assert (workdir / png).stat().st_size > 1000

    # The ingredients resumed from the warm-up arm's checkpoint at step 2 (the branch point).
    ing = json.loads((workdir / "stages" / "ing_re_rtd_s0" / "done.json").read_text())
    assert ing["inputs"]["warmup_step"] == 2 and ing["result"]["steps"] == 4


def test_pretraining_rows_have_two_segments_and_itd_room(tmp_path):
    """[CLS] A [SEP] B [SEP] with B of token type 1 (as fine-tuning's pairs); the ITD room check."""

    from clue_jax.data.tokenizer import train_bpe_tokenizer
    from clue_jax.mcl import corpus as mcl

    assert mcl.two_segments("One two three. Four five six. Seven.") == ("One two three.", "Four five six. Seven.")
    assert mcl.two_segments("One. Two three four five. Six seven.") == ("One. Two three four five.", "Six seven.")
    assert mcl.two_segments("No boundary here") == ("No boundary here", None)
    texts = ["Ann was born in Rome. She studied art. She works at Acme.", "Bo likes tea."]
    tok = train_bpe_tokenizer(texts * 5, 300, tmp_path / "tok")
    rows = mcl.encode_corpus(tok, texts, 64, segments=2)
    one = mcl.encode_corpus(tok, texts, 64, segments=1)
    sep = tok.eos_token_id
    for i, (a, b) in enumerate(map(mcl.two_segments, texts)):
        n = int(rows["attention_mask"][i].sum())
        ids, types = rows["input_ids"][i, :n], rows["token_type_ids"][i, :n]
        assert ids[0] == tok.bos_token_id and ids[-1] == sep
        n_b = 0 if b is None else len(tok(b, add_special_tokens=False)["input_ids"]) + 1
        assert types.sum() == n_b and (types[n - n_b:] == 1).all()  # B and its [SEP]
        assert (ids == sep).sum() == (2 if b is not None else 1)
    assert not one["token_type_ids"].any()
    special = (tok.bos_token_id, sep)
    assert mcl.itd_capped_share(rows, 0.15, special) == 0.0
    # at 12 tokens the long text fills its row (no room), the short one still has padding
    assert mcl.itd_capped_share(mcl.encode_corpus(tok, texts, 12, segments=2), 0.15, special) == 0.5
