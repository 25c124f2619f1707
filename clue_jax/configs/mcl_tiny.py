"""MCL on the built-in biography world: ELECTRA vs +STD / +ITD / all three / MCL, and course soups, on a CPU.

    python -m clue_jax.main --config configs/mcl_tiny.py --workdir runs/mcl          # 3 seeds, the report
    python -m clue_jax.main --config configs/mcl_tiny.py:tiny --workdir /tmp/mcl     # 1 seed, seconds of training

Every model is pre-trained for the same number of steps on rich biographies of
the background people, then its discriminator is fine-tuned on the built-in
downstream tasks (SQuAD 2.0-style QA over a biography; "does this sentence
agree with this biography?") over people it never saw. The soup ingredients
branch from the RTD+STD+ITD run at `soups.warmup_fraction` of the steps and
add subsets of the four correction losses. Writes mcl_report.md, summary.json,
replaced_share.png and score_vs_steps.png into the workdir. GLUE tasks and
SQuAD 2.0 join when prepared in `real_tasks.data_dir` (tfds, array_record).
"""
import ml_collections

from clue_jax.train.defaults import train_config

ALL_CORRECTIONS = ("re_rtd_gen", "re_rtd_disc", "re_std_gen", "re_std_disc")


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "mcl"
    c.seed = 0  # world, tokenizer, corpus order, downstream examples
    c.seeds = (0, 1, 2)  # model seeds: initialisation, data order, corruptions, fine-tuning heads
    c.world = dict(seed=0, num_background=1600, num_new=700, zipf_exponent=0.0)
    # style (clue_jax.mcl.downstream.BIO_STYLES): "paper" (one template per attribute, fixed order: what tiny
    # CPU models learn within this step budget), "single_template" (+ the name repeated: longer sequences) or
    # "rich" (bioS paraphrases, shuffled: far slower to learn). The downstream contexts use the same style.
    # segments 2: [CLS] A [SEP] B [SEP], B of token type 1, as fine-tuning's pairs
    c.corpus = dict(style="paper", bios_per_person=1, seq_len=80, num_probe=64, segments=2)
    c.tokenizer = dict(vocab_size=1024)
    c.model = dict(hidden_size=64, embedding_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_len=128,
                   dropout=0.1)
    c.generator = dict(width_fraction=0.5)
    # Settings of every arm's objective; the arms set courses and corrections (clue_jax/pipelines/mcl_pretrain.py ARMS).
    c.objective = dict(sampling="step", course_weights=(), mask_rate=0.15, swap_rate=0.15, insert_rate=0.15,
                       gen_weight=1.0, disc_weight=50.0, regen_weight=1.0, redisc_weight=50.0, temperature=1.0,
                       dropout=True)
    c.arms = ("electra", "std", "itd", "all3", "mcl")
    c.pretrain = train_config(steps=300, batch_size=32, lr=2e-3, warmup_steps=30, schedule="linear",
                              weight_decay=0.01, log_every=50, checkpoint_every=100000)
    c.probe_every = 30  # label-share probe interval (steps)
    c.curve = dict(arms=("electra", "mcl"), fractions=(0.5,))  # + the final step
    # weighted soup: softmax(dev score / tau) ("softmax") or score - min ("min_subtracted")
    c.soups = dict(enabled=True, warmup_arm="all3", warmup_fraction=0.5, kinds=("uniform", "greedy"),
                   weighting="softmax", tau=1.0,
                   ingredients=dict(re_rtd=ALL_CORRECTIONS[:2], re_std=ALL_CORRECTIONS[2:], re_all=ALL_CORRECTIONS))
    c.downstream = dict(train_people=400, dev_people=100, test_people=200, qa_per_person=2, pair_per_person=2,
                        unanswerable_rate=1 / 3, drop_max=1, max_len=120, max_answer_tokens=16, eval_batch=100,
                        tasks=("bios_qa", "bios_pair"))
    c.finetune = train_config(steps=150, batch_size=32, lr=1e-3, warmup_steps=15, schedule="linear",
                              weight_decay=0.01, log_every=50, checkpoint_every=100000)
    # Real tasks, used when their tfds data is prepared in data_dir (else noted in the report and skipped).
    c.real_tasks = dict(glue=(), squad=False, data_dir="", limit_train=2000, dev_size=200, limit_eval=1000,
                        doc_stride=64)  # SQuAD: context windows every doc_stride tokens
    c.random_init = False  # also fine-tune a randomly initialised pair (the no-pre-training floor)
    # detection AUC of every D on held-out text corrupted once by reference_arm's generator (first seed)
    c.intrinsic = dict(enabled=False, reference_arm="electra", num_rows=256, seed=0)
    c.mesh = dict(shape=(-1, 1, 1), dcn_shape=())  # dcn_shape: slices/nodes per axis, () = data first
    c.compile_cache_dir = ""  # persistent XLA cache; "" = workdir/jax_cache, "off" = none
    # trackers besides metrics.jsonl: "tensorboard" (tensorboardX), "wandb" (pip install 'clue-jax[wandb]');
    # () writes metrics.jsonl alone. wandb_project: the W&B project the runs go to.
    c.logging = dict(trackers=("tensorboard",), wandb_project="clue-jax")
    # :tiny trains for seconds to test the code paths; the pipeline says so under its tables.
    c.smoke_test = variant == "tiny"

    if variant == "tiny":
        c.seeds = (0,)
        c.arms = ("electra", "all3", "mcl")  # the other arms run the same code; all3 is the soups' warm-up
        c.curve.arms = ("mcl",)
        c.world.update(num_background=24, num_new=30)
        c.corpus.update(bios_per_person=1, num_probe=8)
        c.tokenizer.vocab_size = 1024
        c.corpus.seq_len = 160  # the tokenizer of 24 biographies has few merges: long sequences
        c.model.update(hidden_size=32, embedding_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_len=192)
        c.pretrain.update(steps=4, batch_size=8, warmup_steps=1, log_every=2)
        c.probe_every = 2
        c.curve.fractions = (0.5,)
        c.soups.ingredients = dict(re_rtd=ALL_CORRECTIONS[:2], re_std=ALL_CORRECTIONS[2:])
        c.downstream.update(train_people=16, dev_people=6, test_people=8, max_len=192, eval_batch=16)
        c.finetune.update(steps=2, batch_size=8, warmup_steps=1, log_every=1)
        c.objective.sampling = "all"
        c.random_init = True
        c.intrinsic.update(enabled=True, num_rows=8)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/mcl_tiny.py (have: tiny)")
    return c
