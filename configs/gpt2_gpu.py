"""GPT-2 on a GPU cluster (SLURM): GPT-2 XL and GPT-2 teachers, the GPT-2 (124M) student learns your corpus with LoRA.

    # one process per GPU (launch/slurm_gpu.sbatch does this for you):
    srun python -m clue_jax.main --config configs/gpt2_gpu.py --workdir /shared/runs/gpt2 \\
        --config.base_models.small=/shared/ckpt/gpt2 --config.base_models.large=/shared/ckpt/gpt2-xl \\
        --config.data.corpus=/shared/data/corpus.jsonl --config.data.qa_file=/shared/data/qa.jsonl

    # the same architecture in miniature, on a CPU, in a minute (tests):
    python -m clue_jax.main --config configs/gpt2_gpu.py:tiny --workdir /tmp/gpt2_tiny

The architecture comes from the checkpoints (HF directories: config.json +
safetensors); `models` below records the published shapes and is only used
if `base_models` is emptied (pre-training from scratch). The tokenizer is
the small checkpoint's (GPT-2 has no pad or BOS token: EOS serves as both).
Training follows the paper's recipe for LLaMA-3/Gemma-2 (GPT-2 was not in
the study): LoRA rank 16 on all projections, lr 5e-4 with a linear schedule
and 10% warm-up, clip 1.0, batch 8; GPT-2 checkpoints are float32, so the
models run in float32 and the teachers score in bfloat16. `cpt.steps` is
epochs x documents / 8; warm-up follows steps unless set.

Mesh: plain data parallelism, one batch row per GPU: batch 8 fits up to 8
GPUs. With more GPUs raise `cpt.batch_size` to a multiple of their number
(and `clues.score_batch` likewise).

The workdir must be one directory that every node sees (NFS, Lustre): process
0 writes stage results and the others read them; orbax writes every
process's shards of a checkpoint into it.

`:tiny`: a GPT-2-shaped model (LayerNorm, learned positions, GELU MLP,
biases, tied embeddings) small enough for a CPU, on the built-in biography
world. Its base models are tiny HF checkpoints from
$CLUE_JAX_TINY_CKPTS/gpt2_{small,large} (the tests write them with PyTorch
transformers) or `--config.base_models.*`; with neither, the tiny models are
pre-trained from scratch first.
"""
import importlib.util
import os

import ml_collections

FAMILY = "gpt2"
CHECKPOINTS = dict(small="/shared/ckpt/gpt2", large="/shared/ckpt/gpt2-xl")
# Published shapes (openai-community/gpt2 / gpt2-xl config.json), for the record and for pre-training from scratch.
_GPT2 = dict(flavour="gpt2", vocab_size=50257, max_len=1024, norm_eps=1e-5, tie_embeddings=True, use_bias=True)
MODELS = dict(small=dict(_GPT2, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
              large=dict(_GPT2, d_model=1600, num_layers=48, num_heads=25, mlp_dim=6400))
_TINY = dict(flavour="gpt2", max_len=256, norm_eps=1e-5, tie_embeddings=True, use_bias=True)
TINY_MODELS = dict(small=dict(_TINY, d_model=32, num_layers=2, num_heads=4, mlp_dim=128),
                   large=dict(_TINY, d_model=48, num_layers=2, num_heads=4, mlp_dim=192))


def _base_config(variant: str) -> ml_collections.ConfigDict:
    """The knowledge pipeline's full set of keys, from configs/quickstart.py."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
    spec = importlib.util.spec_from_file_location("clue_jax_config_quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _paper_recipe(c: ml_collections.ConfigDict) -> None:
    """LoRA 16, lr 5e-4 linear with 10% warm-up, clip 1.0, batch 8 (METHODS.md, section 1)."""
    c.lora.rank = 16
    c.cpt.update(batch_size=8, lr=5e-4, schedule="linear", clip_norm=1.0, weight_decay=0.0)
    c.cpt.warmup_steps = c.cpt.get_ref("steps") // 10


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r} for configs/gpt2_gpu.py (have: tiny)")
    c = _base_config(variant)
    c.seeds = (0, 1, 2)
    c.models = MODELS
    c.base_models = CHECKPOINTS
    c.tokenizer.path = ""  # the small checkpoint's tokenizer
    c.data.update(source="corpus", corpus="/shared/data/corpus.jsonl", qa_file="/shared/data/qa.jsonl")
    c.cpt.update(steps=250, seq_len=512, log_every=10, checkpoint_every=50)  # 100 documents x 20 epochs / 8
    _paper_recipe(c)
    c.clues.update(arms=("plain", "random", "attention", "contrast"), teacher_dtype="bfloat16", score_batch=8,
                   query_block=128)
    c.eval.update(k_shot=5, max_new_tokens=10, batch_size=64)
    c.mesh.shape = (-1, 1, 1)  # data parallel over every GPU

    if variant == "tiny":
        root = os.environ.get("CLUE_JAX_TINY_CKPTS", "")
        c.base_models = {s: os.path.join(root, f"{FAMILY}_{s}") if root else "" for s in ("small", "large")}
        c.models = TINY_MODELS
        c.seeds = (0,)
        c.lora.rank = 4
        c.data.update(source="bios", corpus="", qa_file="")
        c.cpt.update(steps=4, seq_len=256, log_every=2, checkpoint_every=4)
        c.clues.update(arms=("contrast",), teacher_dtype="float32", render_examples=0)
        c.eval.update(k_shot=1, max_new_tokens=4, batch_size=16, cloze=False)
        c.mesh.shape = (-1, 1, 1)
    return c
