"""Clue views of the teachers' scores: the name-token analysis and the per-document HTML/PNG renderings."""
from __future__ import annotations

import os

import jax
import numpy as np

from clue_jax import workdir_fs
from clue_jax.clues import analysis, render, scoring
from clue_jax.data import bios
from clue_jax.models import factory
from clue_jax.pipelines.continual import Context


def _token_offsets(tokenizer, text: str):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def clue_analysis(ctx: Context, split: str = "test", far_attribute: str = "company") -> dict:
    """The paper's analysis: are the name tokens the clues the large model uses?

    - share of name tokens among the top-10 contrast tokens d = s_large - s_small
      of each biography (and the chance level);
    - seen from far: for the query just before the `far_attribute` value, the
      keys the large teacher attends to more than the small one; share of name
      tokens among the top 10 (and chance).
    """
    knowledge = ctx.knowledge[split]
    if knowledge.people is None or split not in ctx.scores:
        return {}
    data = ctx.docs_data[split]
    scores = workdir_fs.load_npz(ctx.scores[split]["path"])
    ids, mask = data["input_ids"], data["attention_mask"]
    name_mask = np.zeros_like(mask)
    query = np.zeros(len(ids), np.int32)
    for i, (text, person) in enumerate(zip(knowledge.docs, knowledge.people)):
        offsets = _token_offsets(ctx.tokenizer, text)
        start = bios.attribute_spans(text, person)[far_attribute][0]
        for j, (a, b) in enumerate(offsets):
            if a < len(person.name):
                name_mask[i, j + 1] = 1  # +1: BOS at position 0
        first_value_token = next(j for j, (a, b) in enumerate(offsets) if b > start)
        query[i] = first_value_token  # row index of the token just before the value (BOS shift cancels)
    d = scores["large"] - scores["small"]
    rows = {}
    for size in ("large", "small"):
        model, _ = factory.load_params(ctx.bases[size]["model_dir"], ctx.mesh)
        rows[size] = np.asarray(jax.jit(lambda m, i, k, q: scoring.attention_from_query(m, i, k, q))(
            model, ids, mask, query))
    bos = (ids == ctx.tokenizer.bos_token_id).astype(np.int32)
    far = analysis.top_tokens_from_query(rows["large"], rows["small"], mask, query, k=10,
                                         name_token_mask=name_mask, exclude_mask=bos)
    chance = analysis.chance_per_example(mask * (1 - bos), name_mask, query)
    return {
        "name_share_top10_contrast": analysis.name_share_in_top_contrast(d, mask, name_mask, k=10),
        "name_share_chance": analysis.name_share_by_chance(mask, name_mask),
        f"name_share_top10_from_{far_attribute}": far["name_share"],
        f"name_share_chance_from_{far_attribute}": float(np.nanmean(chance)),
        "per_document": {"shares": far["shares"].tolist(), "chance": chance.tolist()},
    }


def render_clue_examples(ctx: Context, n: int, split: str = "test") -> list[str]:
    """Writes HTML and PNG views of s_large, s_small and d for the first n documents."""
    if n <= 0 or split not in ctx.scores or jax.process_index() != 0:
        return []
    out_dir = workdir_fs.join(ctx.workdir, "clues")
    workdir_fs.path(out_dir).mkdir(parents=True, exist_ok=True)
    scores = workdir_fs.load_npz(ctx.scores[split]["path"])
    data = ctx.docs_data[split]
    people = ctx.knowledge[split].people
    paths = []
    for i in range(min(n, len(data["input_ids"]))):
        who = people[i].name if people is not None else f"document {i}"  # a user corpus has no people
        length = int(data["attention_mask"][i].sum())
        ids = data["input_ids"][i, :length]
        tokens = [ctx.tokenizer.decode([int(t)]) for t in ids]
        large, small = scores["large"][i, :length], scores["small"][i, :length]
        base = os.path.join(out_dir, f"example_{i}")
        render.render_html(tokens, large, small, large - small, base + ".html", title=f"clues: {who}")
        render.render_heatmap_png(tokens, large, small, large - small, base + ".png", title=f"clues: {who}")
        paths += [base + ".html", base + ".png"]
    return paths
