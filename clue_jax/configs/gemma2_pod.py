"""Gemma-2 on a TPU pod: 9B and 2B teachers, the 2B student learns your corpus with LoRA.

    # on every worker of the pod (launch/tpu_pod.sh does this for you):
    python -m clue_jax.main --config configs/gemma2_pod.py --workdir /mnt/shared/runs/gemma2 \\
        --config.base_models.small=/mnt/ckpt/gemma-2-2b --config.base_models.large=/mnt/ckpt/gemma-2-9b \\
        --config.data.corpus=/mnt/data/corpus.jsonl --config.data.qa_file=/mnt/data/qa.jsonl

    # the same architecture in miniature, on a CPU, in a minute (tests):
    python -m clue_jax.main --config configs/gemma2_pod.py:tiny --workdir /tmp/gemma2_tiny

The architecture comes from the checkpoints (HF directories: config.json +
safetensors, read shard by shard onto the mesh); `models` below records the
published shapes and is only used if `base_models` is emptied (pre-training
from scratch). The tokenizer is the 2B checkpoint's. Training follows the
paper's recipe: LoRA rank 16 on all projections of the student, lr 5e-4
with a linear schedule and 10% warm-up, clip 1.0, bf16 (the checkpoints'
dtype; LoRA adapters and optimizer in float32), batch 8. `cpt.steps` is
epochs x documents / 8 (the paper trained 10-30 epochs); warm-up follows
steps unless set.

The workdir must be one directory that every host sees (NFS, Filestore, a
gcsfuse mount): process 0 writes stage results and the other hosts read them,
and orbax writes every host's shards of a checkpoint into it.

`:tiny`: a Gemma-2-shaped model (pre- and post-norms, GeGLU, grouped-query
attention, logit soft-capping, sliding-window attention on even layers, tied
and scaled embeddings) small enough for a CPU, on the built-in
biography world. Its base models are tiny HF checkpoints from
$CLUE_JAX_TINY_CKPTS/gemma2_{small,large} (the tests write them with
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

FAMILY = "gemma2"
CHECKPOINTS = dict(small="/mnt/ckpt/gemma-2-2b", large="/mnt/ckpt/gemma-2-9b")
# Published shapes (google/gemma-2-2b / -9b config.json), for the record and for pre-training from scratch.
_GEMMA2 = dict(flavour="gemma2", vocab_size=256000, head_dim=256, max_len=8192, norm_eps=1e-6, tie_embeddings=True,
               rope_theta=10000.0, sliding_window=4096, attn_logit_softcap=50.0, final_logit_softcap=30.0,
               query_pre_attn_scalar=256.0, dtype="bfloat16", param_dtype="bfloat16", remat=True)
MODELS = dict(small=dict(_GEMMA2, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, mlp_dim=9216),
              large=dict(_GEMMA2, d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, mlp_dim=14336))
_TINY = dict(flavour="gemma2", head_dim=16, max_len=256, norm_eps=1e-6, tie_embeddings=True, rope_theta=10000.0,
             sliding_window=32, attn_logit_softcap=50.0, final_logit_softcap=30.0, query_pre_attn_scalar=16.0)
TINY_MODELS = dict(small=dict(_TINY, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
                   large=dict(_TINY, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96))


VARIANTS = _recipe.VARIANTS


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return _recipe.hf_family_config(
        variant, config_file="gemma2_pod.py", family=FAMILY, checkpoints=CHECKPOINTS, models=MODELS,
        tiny_models=TINY_MODELS, data_dir="/mnt/data",
        # Pod mesh: batch over 8 fsdp ways (batch 8), heads/MLP over the rest (tensor = devices / 8, e.g. 4 on a v4-64).
        # Several slices: e.g. --config.mesh.shape="(2,4,-1)" --config.mesh.dcn_shape="(2,1,1)" (data across them).
        mesh_shape=(1, 8, -1))
