"""The extraction pipeline end to end (configs/extraction.py:tiny via the CLI), and the report's verdicts."""
import json
import math
import os
import subprocess
import sys

from clue_jax.extraction import baselines, report, seed_stats
from clue_jax.extraction.shock import BUCKETS
from test_stage_plan import assert_plan_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "extraction.py") + ":tiny"
ARMS = ("base", "vanilla", "mixing/interpolate", "mixing/log_linear", "mixture", "both/interpolate", "both/log_linear",
        "best_of_base_vanilla")


def test_tiny_pipeline_end_to_end(tmp_path):
    workdir = tmp_path / "ex"
    env = dict(os.environ, CI="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    proc = subprocess.run([sys.executable, "-m", "clue_jax.main", "--config", TINY, "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shock rho" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert_plan_kept(proc.stderr, summary)  # the sweep's lengths, the compute-matched one among them

    assert set(ARMS) | {f"rank:{a}" for a in ARMS} <= set(summary["arms"])
    for arm in ARMS:
        entry = summary["arms"][arm]
        assert entry["n"] == 1 and set(entry["per_seed"]) == ({"-"} if arm == "base" else {"0"})
        run = next(iter(entry["per_seed"].values()))
        assert 0.0 <= run["exact_match"] <= 1.0 and 0.0 <= run["f1"] <= 1.0
        assert set(run["buckets"]) == set(BUCKETS)
        assert sum(b["count"] for b in run["buckets"].values()) == summary["data"]["test_items"] == 6 * 5
        assert {"rho", "p_value", "n", "partial_rho", "partial_rho_z", "null"} <= set(run["shock"])
        assert run["shock"]["null"]["draws"] == 20 and set(run["pred_over_gold"]) == {"dropped", "oversampled"}
        strata = run["pred_over_gold_strata"]
        assert set(strata) == {"0", "1", "2"}
        assert sum(c["gold"] for row in strata.values() for c in row.values()) == 6 * 5
        assert set(run["per_relation"]) == set(summary["data"]["relations"])
    # Lambdas strictly inside (0, 1); the endpoints are the base and vanilla arms, and mixing is also compared with
    # the better of the two on dev.
    for arm in ("mixing/interpolate", "both/log_linear"):
        assert summary["arms"][arm]["per_seed"]["0"]["lambda"] == 0.5
    assert summary["arms"]["rank:mixing/log_linear"]["per_seed"]["0"]["lambda"] in (0.25, 0.75)
    sweep = summary["sweeps"]["vanilla"]["0"]
    assert set(sweep["decode"]) == set(sweep["rank"]) == {"interpolate", "log_linear"}
    assert set(sweep["decode"]["interpolate"]) == {"0.5"} and set(sweep["rank"]["log_linear"]) == {"0.25", "0.75"}
    arms = summary["arms"]
    best = arms["best_of_base_vanilla"]["per_seed"]["0"]
    pick = "vanilla" if arms["vanilla"]["per_seed"]["0"]["dev_exact_match"] > arms["base"]["per_seed"]["-"][
        "dev_exact_match"] else "base"
    assert best["choice"] == pick

    # Baselines bookkeeping: mixture = ft.steps QA batches + replay batches at ratio 1; the compute-matched vanilla
    # runs as many steps in all; the vanilla arm is the sweep length best on dev.
    stages = summary["stages"]
    mix = stages["ft_mixture_s0"]
    assert mix["finetune_batches"] == 4 and mix["pretrain_batches"] in (3, 4)
    assert mix["steps"] == mix["finetune_batches"] + mix["pretrain_batches"] == summary["matched_steps"]
    assert stages[f"ft_vanilla_t{mix['steps']}_s0"]["steps"] == mix["steps"]
    assert arms["vanilla@matched"]["per_seed"]["0"]["steps"] == mix["steps"]
    assert {stages[f"ft_vanilla_t{n}_s0"]["steps"] for n in (2, 4)} == {2, 4}
    dev = {int(n): v["dev_exact_match"] for n, v in summary["steps_sweep"]["0"].items()}
    assert set(dev) == {2, 4, mix["steps"]}  # the sweep includes the compute-matched length
    chosen = arms["vanilla"]["per_seed"]["0"]["steps"]
    assert chosen == min(dev, key=lambda n: (-dev[n], n))
    assert arms["vanilla"]["per_seed"]["0"]["exact_match"] == summary["steps_sweep"]["0"][str(chosen)]["exact_match"]
    # The replay corpus leaves out the dev and test people (20 people in the splits + 6 background: 16 replayed).
    assert summary["data"]["replay_people"] == 26 - 4 - 6

    # The fine-tuning set is skewed: some common-object items left out, some rare ones repeated.
    assert summary["skew"]["dropped_items"] > 0 and summary["skew"]["rare_items"] > 0
    assert summary["data"]["finetune_examples"] == summary["skew"]["items"]

    # Knowledge-free predictors scored as arms, the gate on the left-out questions, shock sizes bracketing the arms.
    assert set(summary["knowledge_free"]) == set(baselines.NAMES)
    for entry in summary["knowledge_free"].values():
        assert set(entry["per_seed"]) == {"0"} and set(entry["per_seed"]["0"]["buckets"]) == set(BUCKETS)
    gate = summary["gate"]
    assert isinstance(gate["passed"], bool) and gate["questions"] > 0
    assert gate["best_knowledge_free"] in baselines.NAMES
    assert {"vanilla", "sample:finetune", "sample:prior"} <= set(summary["shock_size"])

    text = (workdir / "extraction_report.md").read_text()
    assert text.index("## Gate: does fine-tuning extract knowledge?") < text.index("## Shock size")
    assert "The extraction gate " in proc.stdout
    for name in baselines.NAMES:
        assert f"| no model: {name} " in text
    assert text.index("## Predicted / gold per pre-training stratum") < text.index("## Findings (as measured)")
    for heading in ("## Findings (as measured)", "## Shock statistics against their null", "## Exact match against "
                    "vanilla fine-tuning steps", "## Greedy decoding", "## Candidate ranking", "## Runtime"):
        assert heading in text
    cells = " ".join(text.split())  # table cells are padded to their column's width
    assert "Verdict:" in text and "| vanilla |" in cells and "| both/log_linear |" in cells
    for rel in summary["plots"].values():
        with open(workdir / rel, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"shock:vanilla", "shock:base", "lambda_sweep", "em_vs_steps"} <= set(summary["plots"])


def _run(em, rho, p=0.001, lam=None, q95=0.2, dev=None, perm=None):
    """One arm's metrics; rho doubles as the partial statistic, whose null has mean 0, std 0.1 and 95th
    percentile `q95`; its permutation p-value is `perm` (default 0.01 above q95, else 0.5)."""
    perm = (0.01 if rho > q95 else 0.5) if perm is None else perm
    null = {k: {"mean": 0.0, "std": 0.1, "q95": q95} for k in ("rho", "partial_rho")}
    run = {"exact_match": em, "f1": em, "dev_exact_match": em if dev is None else dev,
           "shock": {"rho": rho, "p_value": p, "n": 50, "partial_rho": rho, "partial_rho_z": rho / 0.1, "null": null,
                     "permutation_p": perm},
           "buckets": {b: {"exact_match": em, "count": 10} for b in BUCKETS}, "per_relation": {"major": em}}
    if lam is not None:
        run["lambda"] = lam
    return run


def _summary(per_arm):
    arms = {arm: {"per_seed": runs, **seed_stats.mean_std(list(runs.values()))} for arm, runs in per_arm.items()}
    return {"arms": arms, "seeds": [0, 1, 2], "data": {"relations": ["major"]}}


def test_findings_state_the_measured_direction():
    seeds = ("0", "1", "2")
    shocked = _summary({
        "base": {"-": _run(0.30, 0.10)},
        "vanilla": {s: _run(0.35 + 0.01 * i, 0.50 + 0.02 * i) for i, s in enumerate(seeds)},
        "mixing/interpolate": {s: _run(0.40 + 0.01 * i, 0.20, lam=0.5) for i, s in enumerate(seeds)},
        "mixing/log_linear": {s: _run(em, 0.3, lam=0.5) for s, em in zip(seeds, (0.40, 0.30, 0.39))},
        "mixture": {s: _run(0.33, 0.45) for s in seeds},
        "both/interpolate": {s: _run(0.45, 0.15, lam=0.25) for s in seeds},
    })
    text = " ".join(report.findings(shocked))
    assert "produces the frequency shock" in text
    assert "beyond both nulls in 3/3 seed(s)" in text and "permutation p = 0.010, 0.010, 0.010" in text
    assert "mixing/interpolate vs vanilla: EM +0.050 ± 0.000 (helps" in text
    assert "partial shock rho vs vanilla -0.320 ± 0.020 (lowered" in text
    assert "mixture vs vanilla: EM -0.030" in text and "(hurts" in text
    assert "both together: better" in text
    # A mean difference inside the seed spread is called no clear change, not a gain.
    assert "mixing/log_linear vs vanilla: EM +0.003 ± 0.057 (no clear change" in text

    # The base model clears the null as well: the shock is not attributed to fine-tuning.
    flat = _summary({"base": {"-": _run(0.3, 0.6)}, "vanilla": {s: _run(0.3, 0.55) for s in seeds}})
    assert "the base model clears the bar too" in " ".join(report.findings(flat))
    # Inside the null in every seed: no shock, whatever the sign of rho.
    none = _summary({"base": {"-": _run(0.3, 0.0)}, "vanilla": {s: _run(0.3, 0.15) for s in seeds}})
    assert "Verdict: no frequency shock was measured" in " ".join(report.findings(none))
    # Above the calibrated null but not beyond the permutation null: not counted.
    perm_only = _summary({"base": {"-": _run(0.3, 0.0)}, "vanilla": {s: _run(0.3, 0.5, perm=0.3) for s in seeds}})
    assert "beyond both nulls in 0/3 seed(s)" in " ".join(report.findings(perm_only))
    stats = seed_stats.mean_std([_run(0.2, 0.1), _run(0.4, math.nan)])
    assert math.isclose(stats["mean"]["exact_match"], 0.3) and math.isclose(stats["std"]["exact_match"], 0.2 / 2 ** 0.5)
    assert stats["mean"]["shock"]["rho"] == 0.1 and stats["std"]["shock"]["rho"] == 0.0
    # Mixing against the better of base and vanilla on dev (per seed), as the pipeline records it.
    from clue_jax.extraction.arm_metrics import best_of, choose_steps

    per_seed = {"base": {"-": _run(0.30, 0.1, dev=0.31)}, "vanilla": {"0": _run(0.25, 0.5, dev=0.30),
                                                                     "1": _run(0.35, 0.5, dev=0.40)}}
    assert best_of(per_seed, "", "0")["choice"] == "base" and best_of(per_seed, "", "1")["choice"] == "vanilla"
    assert best_of(per_seed, "rank:", "0") is None
    assert choose_steps({30: 0.2, 60: 0.3, 120: 0.3}) == 60
    table = " ".join(report.arm_table(shocked).split())  # cells padded to their column's width
    assert "| mixing/interpolate | 3 | 0.410 ± 0.010 |" in table and "| 0.5, 0.5, 0.5 |" in table


def test_skew_ratios_count_per_relation():
    from clue_jax.data.bios import QAItem
    from clue_jax.extraction.arm_metrics import skew_ratios

    items = [QAItem("A", "major", "q", "Botany"), QAItem("B", "major", "q", "Botany"),
             QAItem("C", "major", "q", "Geology"), QAItem("D", "birth_city", "q", "Oakmouth")]
    skew = {"dropped_objects": {"major": ["Botany"], "birth_city": []},
            "rare_objects": {"major": ["Geology"], "birth_city": ["Oakmouth"]}}
    # Botany (left out) predicted once for two golds; the rare objects predicted 3 times for 2 golds, but
    # "Geology" given for a birth city does not count.
    out = skew_ratios(items, ["Botany", "Geology", "Geology", "Geology"], skew)
    assert out == {"dropped": 0.5, "oversampled": 1.0}
    assert math.isnan(skew_ratios(items, ["", "", "", ""], {"dropped_objects": {}, "rare_objects": {}})["dropped"])


class _CharTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (ord(c) % 100) for c in t] for t in texts]}


def test_candidate_scores_bucketed_equal_row_by_row_scoring():
    import numpy as np

    from clue_jax.data.bios import QAItem
    from clue_jax.eval import decode
    from clue_jax.models import factory
    from clue_jax.models.config import ModelConfig
    from clue_jax.extraction.answers import candidate_scores, ranked_predictions
    from clue_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh((-1, 1, 1))
    model = factory.create(ModelConfig(flavour="llama", vocab_size=128, d_model=16, num_layers=1, num_heads=2,
                                       mlp_dim=32, max_len=64), 0, mesh)
    tok = _CharTokenizer()
    items = [QAItem("A", "major", "Q major A?", "x"), QAItem("B", "birth_city", "Q city of B, please?", "y"),
             QAItem("C", "major", "Q?", "z")]
    candidates = {"major": ["Botany", "Law", "Art History of Europe"], "birth_city": ["Oakmouth", "Fen"]}
    seqs = [[tok.bos_token_id, *tok([it.question])["input_ids"][0]] for it in items]
    got = candidate_scores(model, tok, seqs, items, candidates, batch_size=4, bucket=8)
    fn = decode.model_logits_fn(model)
    for rel, rows in (("major", [0, 2]), ("birth_city", [1])):
        assert got[rel].shape == (len(rows), len(candidates[rel]))
        for r, i in enumerate(rows):
            for c, cand in enumerate(candidates[rel]):
                cont = tok([" " + cand])["input_ids"][0]
                want = decode.score_continuations(fn, [seqs[i]], [cont], tok.pad_token_id)[0]
                np.testing.assert_allclose(got[rel][r, c], want, rtol=1e-4, atol=1e-4)
    preds = ranked_predictions(items, candidates, got)
    assert preds[0] == candidates["major"][int(np.argmax(got["major"][0]))]
    assert preds[1] in candidates["birth_city"]
