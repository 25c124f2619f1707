"""Quickstart: the knowledge-learning pipeline on the built-in biography world, on a CPU.

    python -m clue_jax.main --config configs/quickstart.py --workdir runs/qs
    python -m clue_jax.main --config configs/quickstart.py:tiny --workdir /tmp/qs_tiny   # seconds, for tests

A small (0.28M parameters) and a large (3.4M, 12x, trained twice as long)
LLaMA-style base model are pre-trained on 200 background people (rich bios +
QA); they are the teacher pair. The small one then learns 100 new people's
bios under the paper's protocol (20 epochs over each arm's data: plain over
the originals, attention and contrast dropout over 1 original + 10 fixed
copies) and is asked about them (cloze and 5-shot QA). The tokenizer's 4096
requested entries (the world's text saturates it below that) write a name in
2 tokens.

Dropout settings: `clues.chosen` holds the (alpha, beta) per arm that the
replication (configs/replicate_bios.py) chose for the small student on dev
people by its written rule; until that run is made, it is empty and every arm
uses clues.alpha / clues.beta, which no search chose.
Timing: the large teacher's pre-training runs once per workdir (see README);
with the teachers cached the default run is meant to take <= 10 minutes on 2 cores.
"""
import ml_collections

from clue_jax.train.defaults import train_config


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "knowledge"
    c.seed = 0
    c.seeds = (0,)
    c.world = dict(seed=0, num_background=200, num_new=100, zipf_exponent=0.0)
    # cpt_replay_rows: rows of background text (rich bios + QA) in every continual-pre-training batch;
    # 0 is the paper's protocol (new documents only).
    c.data = dict(source="bios", corpus="", qa_file="", num_dev=0, bios_per_person=4, pretrain_qa=True,
                  cpt_replay_rows=0)
    c.tokenizer = dict(path="", vocab_size=4096)
    small = dict(flavour="llama", d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192,
                 max_len=256, tie_embeddings=True, rope_theta=10000.0)
    large = dict(small, d_model=192, num_layers=6, num_heads=6, num_kv_heads=6, mlp_dim=576)
    c.models = dict(small=small, large=large)
    # HF checkpoint directories to use instead of pre-training the base models (e.g. LLaMA-3 8B / 70B).
    c.base_models = dict(small="", large="")
    # LoRA for the continual pre-training student (the paper: rank 16 on all projections); rank 0 = full.
    c.lora = dict(rank=0, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))
    c.pretrain = train_config(steps=300, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=30,
                              weight_decay=0.1, log_every=40, checkpoint_every=150)
    # per base model: the large teacher pre-trains longer (a real capability gap, not only a size gap)
    c.pretrain_steps = dict(small=300, large=600)
    # cpt.steps is used without a protocol; with one, each arm's steps follow protocol.epochs (protocol.py)
    c.cpt = train_config(steps=240, batch_size=16, seq_len=64, lr=1e-3, warmup_steps=24, schedule="linear",
                         weight_decay=0.0, log_every=40, checkpoint_every=1000)
    # names: the budgets to run (paper, equal_compute); epochs within the paper's 10-30; curve_points: cloze EM
    # measured this many times during each run (EM against steps).
    c.protocol = dict(names=("paper",), epochs=20, warmup_fraction=0.1, curve_points=0)
    # mode: cached (teachers score the corpus once), live (inside every step), fixed_copies (the paper's
    # offline K copies + originals). render_examples: HTML/PNG clue views written to workdir/clues/.
    c.clues = dict(arms=("plain", "attention", "contrast"), alpha=0.7, beta=0.03, original_fraction=1 / 11,
                   mode="cached", copies=10, protected_extra=(), teacher_dtype="float32", query_block=64,
                   score_batch=32, render_examples=4,
                   # MEASURED VALUES GO HERE: summary.json["chosen"]["small"] of a finished
                   # configs/replicate_bios.py run, e.g. attention=dict(alpha=..., beta=...), contrast=dict(...).
                   # Not yet measured: empty, so every arm uses alpha / beta above.
                   chosen=dict())
    # primary: the probe reports and dev choices rank by. "cloze" ('{name} had a professional role at') tests
    # whether a fact is tied to the name; k-shot "qa" additionally needs extraction skill, which models
    # this small lack for people they met only after pre-training (QA is reported too).
    c.eval = dict(k_shot=5, max_new_tokens=16, batch_size=100, cloze=True, primary="cloze")
    c.mesh = dict(shape=(-1, 1, 1), dcn_shape=())  # dcn_shape: slices/nodes per axis, () = data first
    # :tiny trains for seconds to test the code paths; the pipeline says so under its tables.
    c.smoke_test = variant == "tiny"

    if variant == "tiny":
        c.world.update(num_background=24, num_new=8)
        c.data.bios_per_person = 1
        c.tokenizer.vocab_size = 512
        c.models.small.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
        c.models.large.update(d_model=48, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=96)
        c.pretrain.update(steps=4, batch_size=8, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.pretrain_steps.update(small=4, large=6)
        c.cpt.update(steps=4, batch_size=8, seq_len=160, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.protocol.update(epochs=1, curve_points=0)
        c.clues.copies = 2
        c.eval.update(k_shot=1, max_new_tokens=4, batch_size=16)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/quickstart.py (have: tiny)")
    return c
