"""MCL against ELECTRA with measurements that can tell them apart, sized for about an hour on 2 CPU cores.

    python -m clue_jax.main --config configs/mcl_compare.py --workdir runs/mcl_compare      # 3 seeds
    python -m clue_jax.main --config configs/mcl_compare.py:timing --workdir /tmp/mcl_t     # a short timing run
    python -m clue_jax.main --config configs/mcl_compare.py:tiny --workdir /tmp/mcl_c       # seconds of training

What changes against configs/mcl_tiny.py:
- three arms, ELECTRA (RTD), RTD+STD+ITD and MCL, with every course on every
  step (`sampling="all"`, as the published comparison), pre-trained longer
  so the generator engages (RTD's replaced share falls clearly below 0.10),
  and a random-init reference (fine-tuned without pre-training);
- every discriminator's detection AUC on held-out biographies corrupted once
  by ELECTRA's generator (seed 0), the same tokens for every arm: a
  low-noise intrinsic metric, at half and at full pre-training;
- QA with 2000 test questions (SQuAD 2.0 style, a third unanswerable) and
  the answerable-only F1 beside F1; the pair task is dropped (a random-init
  discriminator scores the same on it: it measured nothing);
- segment B of each pre-training row gets token type 1 as in fine-tuning;
  seq_len leaves ITD room for its insertions; no soups (their cost would
  not fit the hour).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "clue_jax_config_mcl_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "mcl_tiny.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

VARIANTS = ("", "tiny", "timing")  # "" = the default; listed by --help


def _protocol(c):
    """The comparison's settings on top of a configs/mcl_tiny.py config."""
    c.arms = ("electra", "all3", "mcl")
    c.random_init = True
    c.objective.sampling = "all"
    c.curve = dict(arms=("electra", "all3", "mcl"), fractions=(0.5,))
    c.soups.enabled = False
    c.intrinsic = dict(enabled=True, reference_arm="electra", num_rows=512, seed=0)
    c.downstream.tasks = ("bios_qa",)
    return c


def get_config(variant: str = ""):
    if variant == "tiny":  # seconds of training on mcl_tiny's tiny world: every stage of the protocol runs
        c = _protocol(_base.get_config("tiny"))
        c.intrinsic.num_rows = 8
        return c
    c = _protocol(_base.get_config())
    c.corpus.update(segments=2, seq_len=96)
    c.model.max_len = 128
    # measured in a 1000-step ELECTRA run (seed 0, otherwise these settings): RTD replaced share 0.130 at step
    # 100, 0.096 at 500, 0.080 at 800, 0.076 at 1000. 800 steps: the generator has engaged and the run fits
    # the hour (timing variant: docs/methods.md, "MCL").
    c.pretrain.update(steps=800, batch_size=16, warmup_steps=50, lr=5e-3, log_every=100)
    c.probe_every = 100
    c.world.update(num_background=1600, num_new=1000)
    c.downstream.update(train_people=400, dev_people=100, test_people=500, qa_per_person=4, eval_batch=200)
    if variant == "timing":  # one seed, few steps: seconds per step of each arm, to size the full run
        c.seeds = (0,)
        c.pretrain.update(steps=60, warmup_steps=4, log_every=10)
        c.probe_every = 20
        c.finetune.update(steps=30)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/mcl_compare.py (have: {VARIANTS[1:]})")
    return c
