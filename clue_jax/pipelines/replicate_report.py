"""The replication's report: gate first, then per protocol the tables, the curves and the paired comparisons."""
from __future__ import annotations

import numpy as np

from clue_jax import workdir_fs
from clue_jax.clues import gate
from clue_jax.eval import bootstrap
from clue_jax.eval.tables import format_table, mean_std

PROTOCOL_TITLES = {"paper": "the paper's protocol (equal epochs over 1 original + K fixed copies)",
                   "equal_compute": "equal compute (every arm plain's steps, dropout drawn fresh)",
                   "long": "long (every arm, plain included, the paper's dropout-arm steps; dropout drawn fresh)"}


def _attrs(summary, results):
    dist = summary["distance_from_name"]
    first = next(iter(results.values()))["base"][0][summary["primary"]]
    return sorted((a for a in first if a != "all"), key=lambda a: dist.get(a, 0.0))


def _cell(runs, probe, attr, metric):
    return mean_std([r[probe][attr][metric] for r in runs])


def protocol_note(config, protocol: str, steps: dict, documents: int) -> str:
    """What the budget of each arm is, in steps and in views of each intact document."""
    c = config.clues
    views = {arm: s * config.cpt.batch_size / max(1, documents) for arm, s in steps.items()}
    plain = steps.get("plain", next(iter(steps.values())))
    drop = next((s for a, s in steps.items() if a != "plain"), plain)
    if protocol == "paper":
        intact = 1.0 / (c.copies + 1)
        how = (f"`fixed_copies`: {c.copies} dropped copies made once per document, trained with the original "
               f"for {config.protocol.epochs} epochs")
    else:
        intact = c.original_fraction
        how = f"`cached` mode: dropout drawn fresh every step, a share {c.original_fraction:.3f} left intact"
    v = views.get("plain", plain * config.cpt.batch_size / max(1, documents))
    return (f"Protocol: plain trains {plain} steps of {config.cpt.batch_size} ({v:.0f} views of each of the "
            f"{documents} documents); a dropout arm trains {drop} steps ({how}), so it sees each document intact "
            f"about {drop * config.cpt.batch_size / max(1, documents) * intact:.1f} times.")


def render_report(summary: dict, config) -> str:
    g = summary["teacher_gate"]
    data = summary.get("data") or {"source": "bios"}
    lens = summary.get("token_lengths") or {}
    lines = ["# Clue dropout on " + (data["title"] if data["source"] == "corpus" else "the biography world"), "",
             "## Teacher gate", "", *gate.describe(g, probe=g.get("probe", "qa")), ""]
    test_people = config.world.num_new - int(config.data.get("num_dev", 0))
    what = (f"questions: {data['qa']}" if data["source"] == "corpus" else
            f"{test_people} test people, {config.data.num_dev} dev people")
    lines += [f"Students: {', '.join(config.students)}; seeds: {list(config.seeds)}; {what}. Mean ± sample std "
              "over seeds; `base` is the student before continual pre-training. Comparisons: paired bootstrap over "
              "people x seeds (95% interval); a difference is called only where the interval excludes 0.", ""]
    if lens:
        lines += ["Tokens per field (mean, inside the biographies): " + ", ".join(
            f"{a} {v:.1f}" for a, v in lens.items()), ""]
    for protocol, p in summary["protocols"].items():
        lines += _protocol_section(summary, config, protocol, p)
    lines += _grid_section(summary, config)
    lines += ["## Which tokens are clues (test documents)", ""]
    for key, value in summary["clue_analysis"].items():
        lines.append(f"- {key}: {value:.3f}" if value is not None else f"- {key}: n/a")
    return "\n".join(lines) + "\n"


def _protocol_section(summary, config, protocol, p) -> list[str]:
    results = p["results"]
    attrs = _attrs(summary, results)
    dist = summary["distance_from_name"]
    primary = summary["primary"]
    documents = summary["data"].get("documents", 0)
    lines = [f"## {PROTOCOL_TITLES.get(protocol, protocol)}", "", protocol_note(config, protocol, p["steps"],
                                                                              documents), ""]
    header = ["arm"] + [f"{a} ({dist.get(a, 0):.0f} tok)" for a in attrs] + ["all"]
    for student, arms in results.items():
        for probe, title in ((primary, f"{primary} exact match"), ("qa" if primary != "qa" else None, "QA exact match")):
            if probe is None or probe not in arms["base"][0]:
                continue
            rows = [[arm] + [_cell(runs, probe, a, "exact_match") for a in attrs + ["all"]] for arm, runs in arms.items()]
            lines += [f"### {title}, {student} student", "", format_table(rows, header), ""]
        if "value_nll" in arms["base"][0]:
            rows = [[arm] + [mean_std([r["value_nll"][a]["nll"] for r in runs]) for a in attrs + ["all"]]
                    for arm, runs in arms.items()]
            lines += [f"### NLL of the values in the intact biographies (nats per value, lower is better), "
                      f"{student} student", "", format_table(rows, header), ""]
        lines += _curve_table(arms, student)
        for arm, entry in p["comparisons"].get(student, {}).items():
            parts = [f"{probe} {bootstrap.describe(iv)} ({bootstrap.verdict(iv, 'contrast ahead', 'contrast behind')})"
                     for probe, iv in entry.items()]
            lines.append(f"- {student}: contrast - {arm} on the far attributes: " + "; ".join(parts))
        lines.append("")
    return lines


def _curve_table(arms: dict, student: str) -> list[str]:
    """Cloze EM (all attributes, mean over seeds) at each measured step, per arm: is an arm still learning?"""
    rows = []
    for arm, runs in arms.items():
        curves = [r.get("train", {}).get("curve") for r in runs]
        if not curves or not all(curves):
            continue
        points = zip(*[[(pt["step"], pt["all"]) for pt in c] for c in curves])
        rows.append([arm, "  ".join(f"{steps[0][0]}: {np.mean([x for _, x in steps]):.2f}" for steps in points)])
    if not rows:
        return []
    return [f"### EM (all attributes) against steps, {student} student", "",
            format_table(rows, ["arm", "step: EM"]), ""]


def _grid_section(summary, config) -> list[str]:
    if not config.grid.enabled:
        return ["## Dropout settings (set, not chosen: grid.enabled is False)", "",
                f"- clues.alpha={config.clues.alpha}, clues.beta={config.clues.beta}", ""]
    lines = [f"## Settings chosen on dev people ({config.grid.protocol} protocol, seed {config.grid.seed}, "
             f"{summary['primary']} exact match over all attributes; rule: the highest, ties to the milder)", ""]
    for student, trials in summary["grid"].items():
        for arm, points in trials.items():
            tried = ", ".join(
                ("" if arm == "plain" else f"{ {k: v for k, v in t.items() if k != 'dev_em'} } -> ") + f"{t['dev_em']:.3f}"
                for t in points)
            choice = summary["chosen"][student].get(arm)
            lines.append(f"- {student} {arm}: " + (f"chose {choice} ({tried})" if choice else tried))
    return lines + [""]


def plot_em_vs_distance(summary: dict, path: str, protocol: str | None = None) -> None:
    from matplotlib.figure import Figure

    protocol = protocol or next(iter(summary["protocols"]))
    results = summary["protocols"][protocol]["results"]
    attrs = _attrs(summary, results)
    dist = summary["distance_from_name"]
    fig = Figure(figsize=(5 * len(results), 4))
    for i, (student, arms) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for arm, runs in arms.items():
            values = np.array([[r[summary["primary"]][a]["exact_match"] for a in attrs] for r in runs])
            std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(attrs))
            ax.errorbar([dist.get(a, 0) for a in attrs], values.mean(axis=0), yerr=std, marker="o", capsize=3,
                        label=arm)
        ax.set_xlabel("tokens between the name and the attribute value")
        ax.set_ylabel(f"{summary['primary']} exact match")
        ax.set_title(f"{student} student, {protocol} protocol")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    workdir_fs.savefig(fig, path, dpi=120)


def plot_curves(summary: dict, path: str) -> None:
    """EM against steps, one panel per protocol x student, one line per arm (mean over seeds)."""
    from matplotlib.figure import Figure

    panels = [(p, s, arms) for p, v in summary["protocols"].items() for s, arms in v["results"].items()]
    fig = Figure(figsize=(5 * len(panels), 4))
    for i, (protocol, student, arms) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for arm, runs in arms.items():
            curves = [r.get("train", {}).get("curve") for r in runs]
            if curves and all(curves):
                steps = [pt["step"] for pt in curves[0]]
                ax.plot(steps, np.mean([[pt["all"] for pt in c] for c in curves], axis=0), marker="o", label=arm)
        ax.set_xlabel("training step")
        ax.set_ylabel("exact match (all attributes)")
        ax.set_title(f"{student} student, {protocol}")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    workdir_fs.savefig(fig, path, dpi=120)
