"""Frequency shock in fine-tuning for knowledge extraction, and its two remedies, on the built-in world.

    python -m clue_jax.main --config configs/extraction.py --workdir runs/extraction
    python -m clue_jax.main --config configs/extraction.py:tiny --workdir /tmp/ex_tiny   # a minute, for tests
    # a base checkpoint of your own (clue_jax model dir or HF directory; tokenizer from tokenizer.path or that dir):
    python -m clue_jax.main --config configs/extraction.py --workdir runs/ex2 --config.base_models.small=DIR

A small LLaMA-style base model is pre-trained on the rich bios of every person
of a Zipf-skewed world (zipf_exponent 1, so objects differ in pre-training
frequency) plus the QA of `splits.pretrain_qa` people (0: the base model has
never seen the QA format, so fine-tuning has something to teach). It is
fine-tuned on the QA of `splits.finetune` other people, skewed on purpose
(`skew`: within each pre-training-frequency stratum of each relation, a random
share of the objects left out, another over-sampled): plainly for every length
in `sweep.steps` (the vanilla arm is the length best on dev) and for as many
steps as the mixture arm (compute-matched), and with replay batches of the
pre-training corpus minus the dev and test people mixed in (`mixture.ratio`),
once per seed; test people are disjoint, dev people choose lambda and the
vanilla length. Writes summary.json, extraction_report.md and plots/ into the
workdir.
"""
import ml_collections

from clue_jax.train.defaults import train_config


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "extraction"
    c.seed = 0  # world split, base pre-training, k-shot prompts
    c.seeds = (0, 1, 2)  # fine-tuning seeds (data order and step RNG)
    splits = dict(pretrain_qa=0, finetune=200, dev=50, test=150)
    c.splits = splits
    # Smaller vocabularies than the default world: each object recurs often enough to count its predictions.
    c.world = dict(seed=0, num_background=sum(splits.values()), num_new=0, zipf_exponent=1.0,
                   num_cities=60, num_universities=60, num_companies=60, num_majors=40)
    c.relations = ("birth_city", "university", "major", "company", "company_city")
    c.data = dict(source="bios", bios_per_person=4)
    c.tokenizer = dict(path="", vocab_size=1024)
    # A base checkpoint to use instead of pre-training one (clue_jax model dir or HF directory), the same key as
    # configs/quickstart.py; its tokenizer comes from tokenizer.path, else from that directory.
    c.base_models = dict(small="")
    c.models = dict(small=dict(flavour="llama", d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                              max_len=256, tie_embeddings=True, rope_theta=10000.0))
    c.pretrain = train_config(steps=800, batch_size=32, seq_len=128, lr=2e-3, warmup_steps=80,
                              weight_decay=0.1, log_every=100, checkpoint_every=400)
    # Skew of the fine-tuning set: per relation, the objects are split into `strata` pre-training-frequency strata;
    # within each, a random `left_out` share of them is left out of fine-tuning and a random `oversampled` share is
    # repeated `repeat` times (drawn with `seed`), so the skew is independent of pre-training frequency.
    c.skew = dict(strata=3, left_out=0.25, oversampled=0.25, repeat=4)
    c.ft = train_config(steps=120, batch_size=32, seq_len=48, lr=5e-4, warmup_steps=10, schedule="linear",
                        weight_decay=0.0, log_every=20, checkpoint_every=1000)
    # Vanilla fine-tuning lengths (EM against steps). ft.steps is the number of QA batches of the mixture arm; a
    # vanilla run as long as the whole mixture run (239 steps at ratio 1: compute-matched) is added to the sweep.
    # The vanilla arm is the length best on dev.
    c.sweep = dict(steps=(30, 60, 120))
    # Mixture fine-tuning: `ratio` replay batches per fine-tuning batch (whole batches, see data/mixture.py) from the
    # pre-training corpus without the dev and test people; match_ft_batches: ft.steps QA batches (more steps in all).
    c.mixture = dict(ratio=1.0, match_ft_batches=True)
    # Lambda grids without 0 and 1: those are the base and vanilla arms; mixing is compared with the better of them.
    c.mixing = dict(modes=("interpolate", "log_linear"), grid=(0.25, 0.5, 0.75),
                    rank_grid=tuple(round(0.05 * i, 2) for i in range(1, 20)))
    c.eval = dict(k_shot=2, max_new_tokens=12, batch_size=128, ranking=True, score_batch=256)
    # null_draws: calibrated-random predictors simulated per arm for the statistics' null (0: none).
    c.shock = dict(smoothing=1.0, null_draws=200)
    c.mesh = dict(shape=(-1, 1, 1), dcn_shape=())  # dcn_shape: slices/nodes per axis, () = data first
    # trackers besides metrics.jsonl: "tensorboard" (tensorboardX), "wandb" (pip install 'clue-jax[wandb]');
    # () writes metrics.jsonl alone. wandb_project: the W&B project the runs go to.
    c.logging = dict(trackers=("tensorboard",), wandb_project="clue-jax")
    # :tiny trains for seconds to test the code paths; the pipeline says so under its tables.
    c.smoke_test = variant == "tiny"

    if variant == "tiny":
        c.seeds = (0,)
        c.splits = dict(pretrain_qa=0, finetune=10, dev=4, test=6)
        c.world.update(num_background=26, num_cities=12, num_universities=12, num_companies=12, num_majors=8)
        c.data.bios_per_person = 1
        c.tokenizer.vocab_size = 400
        c.models.small.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
        c.pretrain.update(steps=4, batch_size=8, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.ft.update(steps=4, batch_size=8, log_every=2, checkpoint_every=4, warmup_steps=1)
        c.sweep.steps = (2, 4)
        c.mixing.update(grid=(0.5,), rank_grid=(0.25, 0.75))
        c.shock.null_draws = 20
        c.eval.update(k_shot=1, max_new_tokens=4, batch_size=32, score_batch=64)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/extraction.py (have: tiny)")
    return c
