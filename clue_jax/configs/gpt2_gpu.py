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
models run in float32 (attention on a GPU through cuDNN in bfloat16, the
precision it supports: clue_jax.models.attention) and the teachers score in
bfloat16. `cpt.steps` is epochs x documents / 8; warm-up follows steps unless set.

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

_spec = importlib.util.spec_from_file_location(
    "clue_jax_config_hf_recipe", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hf_recipe.py"))
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)

FAMILY = "gpt2"
CHECKPOINTS = dict(small="/shared/ckpt/gpt2", large="/shared/ckpt/gpt2-xl")
# Published shapes (openai-community/gpt2 / gpt2-xl config.json), for the record and for pre-training from scratch.
_GPT2 = dict(flavour="gpt2", vocab_size=50257, max_len=1024, norm_eps=1e-5, tie_embeddings=True, use_bias=True)
MODELS = dict(small=dict(_GPT2, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
              large=dict(_GPT2, d_model=1600, num_layers=48, num_heads=25, mlp_dim=6400))
_TINY = dict(flavour="gpt2", max_len=256, norm_eps=1e-5, tie_embeddings=True, use_bias=True)
TINY_MODELS = dict(small=dict(_TINY, d_model=32, num_layers=2, num_heads=4, mlp_dim=128),
                   large=dict(_TINY, d_model=48, num_layers=2, num_heads=4, mlp_dim=192))


VARIANTS = _recipe.VARIANTS


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return _recipe.hf_family_config(
        variant, config_file="gpt2_gpu.py", family=FAMILY, checkpoints=CHECKPOINTS, models=MODELS,
        tiny_models=TINY_MODELS, data_dir="/shared/data",
        # data parallel over every GPU
        mesh_shape=(-1, 1, 1))
