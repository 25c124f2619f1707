"""What a run leaves behind: clue pictures on a robust scale titled with the person,
evaluation scalars in TensorBoard, summary.json's per-stage record, config.json from the Python API, and
the :tiny smoke-test note."""
import json
import os
import struct

import numpy as np
import pytest
from matplotlib import colors

from clue_jax import configs, pipelines
from clue_jax.clues import render
from clue_jax.train import logging_utils


def _read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the tfevents files in run_dir (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for name in sorted(os.listdir(run_dir)):
        data = open(os.path.join(run_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":  # not the hyper-parameters' text
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _whiteness(hex_colour: str) -> float:
    return float(min(colors.to_rgb(hex_colour)))  # 1.0 = white


def test_contrast_scale_ignores_one_spike_and_name_tokens_get_colour(tmp_path):
    tokens = [f"t{i}" for i in range(40)]
    d = np.full(40, 0.002)
    d[:4] = 0.05  # the name: clearly larger than the rest
    d[-2] = 1.0  # one spike before <eos>
    scale = render.contrast_scale(d)
    assert 0.04 <= scale < 0.1  # the 95th percentile, not the spike
    assert render.contrast_scale(np.zeros(5)) == 1.0 and render.contrast_scale([0.0] * 40 + [0.3]) == pytest.approx(0.3)  # all but one 0: the max
    s = np.full(40, 0.1)
    page = open(render.render_html(tokens, s, s, d, str(tmp_path / "c.html"), title="clues: Ada Lovelace")).read()
    fills = [page.split(f">t{i}</span>")[0].rsplit("background:", 1)[1].split(";")[0] for i in range(40)]
    assert _whiteness(fills[0]) < 0.5  # saturated red (with the max as the scale it was 0.95: white)
    assert fills[-2] == fills[0] or _whiteness(fills[-2]) <= _whiteness(fills[0])  # the spike saturates
    assert "<title>clues: Ada Lovelace</title>" in page and "95th percentile" in page


def test_heatmap_png_uses_the_robust_scale(tmp_path, monkeypatch):
    seen = []
    real = render.contrast_scale
    monkeypatch.setattr(render, "contrast_scale", lambda d: seen.append(real(d)) or seen[-1])
    d = np.r_[np.full(30, 0.01), 2.0]
    path = render.render_heatmap_png([str(i) for i in range(31)], np.abs(d), np.zeros(31), d, str(tmp_path / "p.png"),
                                     title="clues: Ada")
    assert os.path.getsize(path) > 1000 and seen == [pytest.approx(0.01)]


def test_eval_scalars_are_written_per_run_with_nested_tags_at_the_step_measured(tmp_path):
    runs = {"plain_s0": {"cloze": {"company": {"exact_match": 0.25, "f1": 0.5}, "all": {"exact_match": 0.1}},
                         "train": {"steps": 4, "final_loss": float("nan"), "ok": True, "note": "text"}},
            "base/small": {"qa": [{"em": 1.0}]}}
    for _ in range(2):  # a rerun replaces its lines
        assert logging_utils.write_eval_scalars(str(tmp_path), runs) == 4
    plain = _read_scalars(tmp_path / "tensorboard" / "eval" / "plain_s0")
    assert {tag: values[-1] for tag, values in plain.items()} == {
        "eval/cloze/company/exact_match": (4, 0.25), "eval/cloze/company/f1": (4, 0.5),
        "eval/cloze/all/exact_match": (4, pytest.approx(0.1))}  # at the model's training step, no step count
    assert _read_scalars(tmp_path / "tensorboard" / "eval" / "base_small")["eval/qa/0/em"][-1] == (0, 1.0)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(l["stage"], l["step"]) for l in lines] == [("eval/plain_s0", 4), ("eval/base_small", 0)]


@pytest.mark.slow
def test_python_api_run_writes_config_stages_eval_scalars_names_and_the_smoke_note(tmp_path, capsys):
    config = configs.get_config("quickstart", "tiny")
    config.clues.arms = ("contrast",)
    config.clues.render_examples = 1
    workdir = str(tmp_path / "api")
    summary = pipelines.run(config, workdir)
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(pipelines.SMOKE_TEST_NOTE) and printed.count("smoke test") == 1

    assert json.load(open(os.path.join(workdir, "config.json")))["clues"]["arms"] == ["contrast"]
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    stages = on_disk["stages"]
    assert set(stages) == set(on_disk["stages_ran"]) >= {"world", "pretrain_small", "cpt_small_contrast_s0"}
    assert all(v["status"] == "ran" for v in stages.values())
    assert stages["pretrain_small"]["result"]["steps"] == config.pretrain.steps
    assert stages["eval_small_contrast_s0"]["result"]["qa"] == summary["models"]["contrast_s0"]["qa"]

    eval_dir = os.path.join(workdir, "tensorboard", "eval")
    assert {"base_small", "contrast_s0"} <= set(os.listdir(eval_dir))
    scalars = _read_scalars(os.path.join(eval_dir, "contrast_s0"))
    steps = summary["models"]["contrast_s0"]["train"]["steps"]
    assert scalars["eval/qa/company/exact_match"] == [(steps, summary["models"]["contrast_s0"]["qa"]["company"]["exact_match"])]
    run = json.load(open(os.path.join(workdir, "config.json")))["run"]
    assert on_disk["run"] == run and set(run) == {"id", "commit", "dirty", "versions"}
    assert {l["run"] for l in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))} == {run["id"]}
    assert on_disk["clue_views"] == ["clues/example_0.html", "clues/example_0.png"]  # relative to the workdir

    page = open(os.path.join(workdir, "clues", "example_0.html")).read()
    assert "document 0" not in page and "<title>clues: " in page
    from clue_jax.pipelines import foundations

    first = foundations.load_people(os.path.join(workdir, "stages", "world"), "new")[0]
    assert f"<title>clues: {first.name}</title>" in page  # the first new person, not "document 0"

    pipelines.run(config, workdir)  # a rerun reuses every stage, and says so per stage
    again = json.load(open(os.path.join(workdir, "summary.json")))["stages"]
    assert set(again) == set(stages) and all(v["status"] == "reused" for v in again.values())
    assert again["eval_small_contrast_s0"]["result"] == stages["eval_small_contrast_s0"]["result"]
