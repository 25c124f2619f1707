"""Quickstart: the knowledge-learning pipeline on the built-in biography world, on a CPU.

    python -m clue_jax.main --config configs/quickstart.py --workdir runs/qs
    python -m clue_jax.main --config configs/quickstart.py:tiny --workdir /tmp/qs_tiny   # seconds, for tests

A small and a large LLaMA-style base model are pre-trained on 200 background
people (rich bios + QA), then the small one learns 100 new people's bios
(plain continual pre-training, plus the attention (large teacher alone) and
contrast clue-dropout arms) and is asked about them 5-shot.

Dropout settings, by a written rule: the replication (configs/replicate_bios.py,
reports/replication/) trains, for the small student and each method, every
published point alpha {0.6, 0.7} x beta {0.005, 0.01, 0.03, 0.05} on 30 dev
people under the paper's protocol and keeps the highest cloze exact match (a
tie to the milder point); its summary.json["chosen"]["small"] is copied into
clues.chosen below: attention and contrast alpha 0.7 / beta 0.005. The
quickstart itself trains every arm the same 240 steps with fresh dropout (the
equal-compute budget, at which plain learns the new people); the paper's
protocol and the controls are the replication's.
"""
import ml_collections

from clue_jax.train.defaults import train_config


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "knowledge"
    c.seed = 0
    c.seeds = (0,)
    # style: "repeated_name" (bioS's rich form) or "pronoun" (the name in a pre-training biography's first
    # sentence only); fillers_before_far: pronoun style, filler sentences before the test bios' far attributes.
    c.world = dict(seed=0, num_background=200, num_new=100, zipf_exponent=0.0, style="repeated_name",
                   fillers_before_far=0)
    # cpt_replay_rows: rows of background text (rich bios + QA) in every continual-pre-training batch;
    # 0 is the paper's protocol (new documents only).
    c.data = dict(source="bios", corpus="", qa_file="", num_dev=0, bios_per_person=4, pretrain_qa=True,
                  cpt_replay_rows=0)
    c.tokenizer = dict(path="", vocab_size=1024)
    small = dict(flavour="llama", d_model=96, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=256,
                 max_len=256, tie_embeddings=True, rope_theta=10000.0, scan_unroll=4)  # 4: unrolled (CPU speed)
    large = dict(small, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=384)
    c.models = dict(small=small, large=large)
    # HF checkpoint directories to use instead of pre-training the base models (e.g. LLaMA-3 8B / 70B).
    c.base_models = dict(small="", large="")
    # LoRA for the continual pre-training student (the paper: rank 16 on all projections); rank 0 = full.
    c.lora = dict(rank=0, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))
    c.pretrain = train_config(steps=320, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=32,
                              weight_decay=0.1, log_every=40, checkpoint_every=160)
    c.cpt = train_config(steps=240, batch_size=16, seq_len=96, lr=1e-3, warmup_steps=24, schedule="linear",
                         weight_decay=0.0, log_every=40, checkpoint_every=240)
    # mode: cached (teachers score the corpus once), live (inside every step), fixed_copies (the paper's
    # offline K copies + originals). render_examples: HTML/PNG clue views written to workdir/clues/.
    # chosen: per arm, the replication's choice (see the docstring); alpha / beta: any other arm's setting.
    chosen = dict(alpha=0.7, beta=0.005)
    c.clues = dict(arms=("plain", "attention", "contrast"), alpha=0.7, beta=0.005, original_fraction=1 / 11,
                   mode="cached", copies=10, protected_extra=(), teacher_dtype="float32", query_block=64,
                   score_batch=32, render_examples=4, chosen=dict(attention=chosen, contrast=dict(chosen)))
    # primary: the probe reports and dev choices rank by. "cloze" ('{name} had a professional role at') tests
    # whether a fact is tied to the name; k-shot "qa" additionally needs extraction skill, which models
    # this small lack for people they met only after pre-training (QA is reported too).
    c.eval = dict(k_shot=5, max_new_tokens=10, batch_size=100, cloze=True, primary="cloze")
    c.mesh = dict(shape=(-1, 1, 1), dcn_shape=())  # dcn_shape: slices/nodes per axis, () = data first
    # trackers besides metrics.jsonl: "tensorboard" (tensorboardX), "wandb" (pip install 'clue-jax[wandb]');
    # () writes metrics.jsonl alone. wandb_project: the W&B project the runs go to.
    c.logging = dict(trackers=("tensorboard",), wandb_project="clue-jax")
    # :tiny trains for seconds to test the code paths; the pipeline says so under its tables.
    c.smoke_test = variant == "tiny"

    if variant == "tiny":
        c.world.update(num_background=24, num_new=8)
        c.data.bios_per_person = 1
        c.tokenizer.vocab_size = 512
        c.models.small.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
        c.models.large.update(d_model=48, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=96)
        c.pretrain.update(steps=4, batch_size=8, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.cpt.update(steps=4, batch_size=8, seq_len=160, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.eval.update(k_shot=1, max_new_tokens=4, batch_size=16)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/quickstart.py (have: tiny)")
    return c
