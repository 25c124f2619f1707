"""Stage lines count against the run's plan: `stage k/n` once a pipeline declares n, `stage k` before, one
warning when a run visits more stages than planned; and a helper the pipelines' end-to-end tests share."""
import logging
import re
import time

from clue_jax.pipelines.stages import Stages
from clue_jax.train import logging_utils

STAGE_LINE = re.compile(r"stage (\d+)/(\d+): \S+: (?:running|resuming|inputs unchanged)")
PLAN_UPDATE = re.compile(r"stages: this run now visits (\d+) stages")


def assert_plan_kept(log_text: str, summary: dict) -> int:
    """The run's last stage line reads n/n for the plan in force at its end, n = the stages it ran or reused."""
    marks = [(int(k), int(n)) for k, n in STAGE_LINE.findall(log_text)]
    assert marks, log_text[-3000:]
    assert "the plan drifted" not in log_text, log_text[-3000:]
    last_k, planned = marks[-1]
    updates = [(m.start(), int(m.group(1))) for m in PLAN_UPDATE.finditer(log_text)]
    last_line = [m.start() for m in STAGE_LINE.finditer(log_text)][-1]
    planned = next((n for at, n in reversed(updates) if at > last_line), planned)
    visited = len(summary["stages_ran"]) + len(summary["stages_reused"])
    assert [k for k, _ in marks] == list(range(1, len(marks) + 1))
    assert last_k == planned == visited, (last_k, planned, visited)
    return planned


def _visit(stages, names):
    for name in names:
        stages.run(name, {"name": name}, lambda d, n=name: {"name": n})


def test_stage_lines_show_the_plan_and_warn_once_when_it_drifts(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="clue_jax")
    stages = Stages(str(tmp_path / "w"))
    _visit(stages, ["a"])
    stages.expect(3)
    _visit(stages, ["b", "c"])
    assert "stage 1: a: running" in caplog.text and "stage 1/" not in caplog.text
    assert "stage 2/3: b: running" in caplog.text and "stage 3/3: c: running" in caplog.text
    assert "drifted" not in caplog.text
    _visit(stages, ["d", "e"])  # two beyond the plan: counted on, one warning
    assert "stage 4/3: d: running" in caplog.text and "stage 5/3: e: running" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "drifted" in r.getMessage()]
    assert len(warnings) == 1 and "stage 4/3: d" in warnings[0].getMessage()
    assert stages.ran == ["a", "b", "c", "d", "e"]

    monkeypatch.setattr(logging_utils, "HEARTBEAT_S", 0.1)  # a silent stage's heartbeat carries k/n too
    stages.run("slow", {}, lambda d: time.sleep(0.5) or {})
    assert "stage 6/3: slow: still running (" in caplog.text
    assert len([r for r in caplog.records if "drifted" in r.getMessage()]) == 1

    caplog.clear()
    again = Stages(str(tmp_path / "w"))
    again.expect(3)
    _visit(again, ["a", "b"])
    again.expect(2)  # the plan shrinks once a count is known
    assert "stage 1/3: a: inputs unchanged, reusing" in caplog.text
    assert "this run now visits 2 stages (planned 3 before)" in caplog.text
    assert assert_plan_kept(caplog.text, {"stages_ran": again.ran, "stages_reused": again.reused}) == 2
