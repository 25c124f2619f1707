"""LLaMA-3 on a TPU pod: 70B and 8B teachers, the 8B student learns your corpus with LoRA.

    # on every worker of the pod (launch/tpu_pod.sh does this for you):
    python -m clue_jax.main --config configs/llama3_pod.py --workdir /mnt/shared/runs/llama3 \\
        --config.base_models.small=/mnt/ckpt/Meta-Llama-3-8B --config.base_models.large=/mnt/ckpt/Meta-Llama-3-70B \\
        --config.data.corpus=/mnt/data/corpus.jsonl --config.data.qa_file=/mnt/data/qa.jsonl

    # the same architecture in miniature, on a CPU, in a minute (tests):
    python -m clue_jax.main --config configs/llama3_pod.py:tiny --workdir /tmp/llama3_tiny

The architecture comes from the checkpoints (HF directories: config.json +
safetensors, read shard by shard onto the mesh); `models` below records the
published shapes and is only used if `base_models` is emptied (pre-training
from scratch). The tokenizer is the 8B checkpoint's. Training follows the
paper's recipe: LoRA rank 16 on all projections of the student, lr 5e-4
with a linear schedule and 10% warm-up, clip 1.0, bf16 (the checkpoints'
dtype; LoRA adapters and optimizer in float32), batch 8. `cpt.steps` is
epochs x documents / 8 (the paper trained 10-30 epochs); warm-up follows
steps unless set.

The workdir must be one directory that every host sees (NFS, Filestore, a
gcsfuse mount): process 0 writes stage results and the other hosts read them,
and orbax writes every host's shards of a checkpoint into it.

`:tiny`: a LLaMA-3-shaped model (RMSNorm, RoPE theta 5e5, SwiGLU, grouped-
query attention, untied head) small enough for a CPU, on the built-in
biography world. Its base models are tiny HF checkpoints from
$CLUE_JAX_TINY_CKPTS/llama3_{small,large} (the tests write them with
PyTorch transformers) or `--config.base_models.*`; with neither, the tiny
models are pre-trained from scratch first.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "clue_jax_config_hf_recipe", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hf_recipe.py"))
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)

FAMILY = "llama3"
CHECKPOINTS = dict(small="/mnt/ckpt/Meta-Llama-3-8B", large="/mnt/ckpt/Meta-Llama-3-70B")
# Published shapes (Meta-Llama-3-8B / -70B config.json), for the record and for pre-training from scratch.
_LLAMA3 = dict(flavour="llama", vocab_size=128256, num_kv_heads=8, head_dim=128, max_len=8192,
               norm_eps=1e-5, tie_embeddings=False, rope_theta=500000.0, dtype="bfloat16", param_dtype="bfloat16",
               remat=True)
MODELS = dict(small=dict(_LLAMA3, d_model=4096, num_layers=32, num_heads=32, mlp_dim=14336),
              large=dict(_LLAMA3, d_model=8192, num_layers=80, num_heads=64, mlp_dim=28672))
TINY_MODELS = dict(
    small=dict(flavour="llama", d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=256,
               norm_eps=1e-5, tie_embeddings=False, rope_theta=500000.0),
    large=dict(flavour="llama", d_model=48, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=96, max_len=256,
               norm_eps=1e-5, tie_embeddings=False, rope_theta=500000.0),
)


VARIANTS = _recipe.VARIANTS


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return _recipe.hf_family_config(
        variant, config_file="llama3_pod.py", family=FAMILY, checkpoints=CHECKPOINTS, models=MODELS,
        tiny_models=TINY_MODELS, data_dir="/mnt/data",
        # Pod mesh: batch over 8 fsdp ways (batch 8), heads/MLP over the rest (tensor = devices / 8, e.g. 4 on a v4-64).
        # Several slices: e.g. --config.mesh.shape="(2,4,-1)" --config.mesh.dcn_shape="(2,1,1)" (data across them).
        mesh_shape=(1, 8, -1))
