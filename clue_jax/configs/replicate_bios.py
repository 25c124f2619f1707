"""Replication of the clue-dropout comparison (Gao et al., AAAI 2025, Table 2) on the biography world, three protocols.

    python -m clue_jax.main --config configs/replicate_bios.py --workdir runs/replicate
    python -m clue_jax.main --config configs/replicate_bios.py:tiny --workdir /tmp/rep_tiny   # tests

Arms: plain, random, attention, contrast, and two controls: rate_matched (contrast's expected number of
drops per document, spread evenly) and shuffled (contrast's p(r), ranks from another document). Student: the
small base model (it learns with the large - small teacher contrast); 3 seeds; 70 test people, 30 dev
people. Protocols (pipelines/protocol.py): "paper" (20 epochs, within the paper's 10-30, over 1 original +
K = 10 fixed copies: a dropout arm trains 11x plain's steps), "equal_compute" (every arm plain's steps,
fresh dropout) and, beside them, "long" (every arm, plain included, the paper's dropout-arm steps, fresh
dropout: does plain catch up when it trains as long?). The teacher gate (clues/gate.py) is measured and
printed first.

Cut to fit about an hour on 2 CPU cores: the large student (the 3.4M large teacher continually pre-trained,
--config.students="('small','large')") is off by default: its steps cost about 6x the small student's.
Measured (docs/methods.md): 46 min for everything but the long protocol on a loaded 2-core CPU, 12.5 min more for
long.

Rule for the settings (written before any run): per student and per method, on the 30 dev people, under the
paper's protocol with seed grid.seed, every published point alpha in {0.6, 0.7} x beta in {0.005, 0.01,
0.03, 0.05} is trained (random: alpha only) and plain beside them; the point with the highest cloze exact
match over all attributes wins, a tie going to the milder setting (smaller alpha, then smaller beta).
rate_matched and shuffled take contrast's winner. The winners are then trained on the test people under every
protocol; nothing on the test people chooses anything. The small student's winners are what
configs/quickstart.py's clues.chosen holds (alpha 0.7, beta 0.005 for attention and contrast, measured).

Built on the quickstart's world and recipe, with its own tokenizer (4096 entries requested: a name in about
2 tokens) and its own teacher pair with a real capability gap: small 2 layers d=64 (0.28M parameters, 300
pre-training steps), large 6 layers d=192 (3.4M, 12x, 600 steps). They are stages, cached in the workdir.
"""
import ml_collections

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("quickstart", os.path.join(os.path.dirname(__file__), "quickstart.py"))
_quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quickstart)


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = _quickstart.get_config("tiny" if variant == "tiny" else "")
    c.pipeline = "replicate"
    c.tokenizer.vocab_size = 4096
    if variant != "tiny":
        c.models.small.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192)
        c.models.large.update(d_model=192, num_layers=6, num_heads=6, num_kv_heads=6, mlp_dim=576)
        c.pretrain.update(steps=300, warmup_steps=30, checkpoint_every=150)
        c.cpt.update(seq_len=64, checkpoint_every=1000)
    # per base model: the large teacher pre-trains longer (a real capability gap, not only a size gap)
    c.pretrain_steps = dict(small=300, large=600)
    c.eval.max_new_tokens = 16
    # names: the budgets run (paper, equal_compute, long; pipelines/protocol.py); epochs within the paper's
    # 10-30; curve_points: cloze EM measured this many times during each run (EM against steps).
    c.protocol = dict(names=("paper", "equal_compute", "long"), epochs=20, warmup_fraction=0.1, curve_points=4)
    c.seeds = (0, 1, 2)
    c.students = ("small",)  # ("small", "large") adds the large student (see the cut above)
    c.data.num_dev = 30  # of the 100 new people
    c.clues.arms = ("plain", "random", "attention", "contrast", "rate_matched", "shuffled")
    c.clues.render_examples = 4
    c.grid = dict(enabled=True, alphas=(0.6, 0.7), betas=(0.005, 0.01, 0.03, 0.05), seed=0, protocol="paper")
    # gate: probe asked of both teachers on `people` background people; the large one must lead by min_gap
    c.gate = dict(probe="qa", people=100, min_gap=0.1)
    c.bootstrap = dict(n_boot=2000)
    if variant == "tiny":  # every piece once, in about a minute: one student, two seeds
        c.seeds = (0, 1)
        c.students = ("small",)
        c.data.num_dev = 3
        c.grid.update(alphas=(0.7,), betas=(0.01, 0.05))
        c.pretrain_steps.update(small=4, large=6)
        c.eval.max_new_tokens = 4
        c.protocol.update(epochs=1, curve_points=2)
        c.clues.copies = 2
        c.gate.people = 8
        c.bootstrap.n_boot = 200
        c.clues.render_examples = 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/replicate_bios.py (have: tiny)")
    return c
