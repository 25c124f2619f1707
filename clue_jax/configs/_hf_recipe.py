"""Shared by the HF-checkpoint configs (llama3_pod.py, gemma2_pod.py, gpt2_gpu.py): the paper's recipe on
the knowledge pipeline, with each family's checkpoints, shapes, data paths and mesh.

Not a config itself (the leading underscore): each family's file imports it and keeps its own docstring.
"""
import importlib.util
import os

import ml_collections

VARIANTS = ("", "tiny")  # "" = the checkpoints; listed by --help
_HERE = os.path.dirname(os.path.abspath(__file__))


def load_config_module(name: str):
    """A sibling config file as a module (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"clue_jax_config_{name}", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_recipe(c: ml_collections.ConfigDict) -> None:
    """LoRA 16, lr 5e-4 linear with 10% warm-up, clip 1.0, batch 8 (docs/methods.md, "Clue dropout")."""
    c.lora.rank = 16
    c.cpt.update(batch_size=8, lr=5e-4, schedule="linear", clip_norm=1.0, weight_decay=0.0)
    c.cpt.warmup_steps = c.cpt.get_ref("steps") // 10


def hf_family_config(variant: str, *, config_file: str, family: str, checkpoints: dict, models: dict,
                     tiny_models: dict, data_dir: str, mesh_shape: tuple) -> ml_collections.ConfigDict:
    """The knowledge pipeline (quickstart keys) with a family's teachers and student, and its `:tiny` twin.

    `:tiny` reads tiny HF checkpoints from $CLUE_JAX_TINY_CKPTS/<family>_{small,large} (the tests write them
    with PyTorch transformers), else pre-trains tiny models from scratch on the built-in world.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for configs/{config_file} (have: tiny)")
    c = load_config_module("quickstart").get_config(variant)
    c.seeds = (0, 1, 2)
    c.models = models
    c.base_models = checkpoints
    c.tokenizer.path = ""  # the small checkpoint's tokenizer
    c.data.update(source="corpus", corpus=f"{data_dir}/corpus.jsonl", qa_file=f"{data_dir}/qa.jsonl")
    c.cpt.update(steps=250, seq_len=512, log_every=10, checkpoint_every=50,  # 100 documents x 20 epochs / 8
                 remat="full")
    paper_recipe(c)
    c.clues.update(arms=("plain", "random", "attention", "contrast"), teacher_dtype="bfloat16", score_batch=8,
                   query_block=128)
    c.eval.update(k_shot=5, max_new_tokens=10, batch_size=64)
    c.mesh.shape = mesh_shape

    if variant == "tiny":
        root = os.environ.get("CLUE_JAX_TINY_CKPTS", "")
        c.base_models = {s: os.path.join(root, f"{family}_{s}") if root else "" for s in ("small", "large")}
        c.models = tiny_models
        c.seeds = (0,)
        c.lora.rank = 4
        c.data.update(source="bios", corpus="", qa_file="")
        c.cpt.update(steps=4, seq_len=256, log_every=2, checkpoint_every=4)
        c.clues.update(arms=("contrast",), teacher_dtype="float32", render_examples=0)
        c.eval.update(k_shot=1, max_new_tokens=4, batch_size=16, cloze=False)
        c.mesh.shape = (-1, 1, 1)
    return c
