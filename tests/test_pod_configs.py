"""The pod/cluster configs: the real variants hold the paper's recipe and fit their meshes; the
`:tiny` variants run end to end on a CPU from tiny random HF checkpoints of the same architecture.

The checkpoints are written by PyTorch transformers (`save_pretrained`) from
each config's own tiny architecture, with a byte-level BPE tokenizer trained
here, so the run goes through exactly the path a user's LLaMA-3 / Gemma-2 /
GPT-2 directory takes: tokenizer from the small checkpoint, both teachers from
safetensors, LoRA student, clue scores, QA evaluation.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.models import hf
from clue_jax.models.config import ModelConfig
from clue_jax.parallel.mesh import resolve_shape

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"llama3": "llama3_pod.py", "gemma2": "gemma2_pod.py", "gpt2": "gpt2_gpu.py"}
FLAVOURS = {"llama3": "llama", "gemma2": "gemma2", "gpt2": "gpt2"}
SENTENCES = [
    "Ada Lovelace was born on December 10, 1815. She spent her early years in London.",
    "She received mentorship and guidance from faculty members at the University of London.",
    "He completed his education with a focus on Mathematics. He had a professional role at IBM.",
    "What is the birth date of Ada Lovelace?\nAnswer: December 10, 1815",
]


def _config_module(family):
    spec = importlib.util.spec_from_file_location(f"cfg_{family}", os.path.join(ROOT, "configs", CONFIGS[family]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Root directory with <family>_small / <family>_large HF checkpoints (+ the tokenizer in each)."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    tok = train_bpe_tokenizer(SENTENCES * 4, 300, root / "tokenizer")
    for i, family in enumerate(CONFIGS):
        models = _config_module(family).get_config("tiny").models
        for j, size in enumerate(("small", "large")):
            cfg = ModelConfig.from_dict({**models[size].to_dict(), "vocab_size": len(tok)})
            ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            config = transformers.AutoConfig.for_model(**hf.config_to_hf(cfg), **ids)
            torch.manual_seed(10 * i + j)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            path = root / f"{family}_{size}"
            model.save_pretrained(path)
            tok.save_pretrained(path)
    return root


@pytest.mark.parametrize("family", CONFIGS)
def test_real_variant_holds_the_paper_recipe(family):
    c = _config_module(family).get_config()
    assert c.pipeline == "knowledge" and c.lora.rank == 16
    assert (c.cpt.lr, c.cpt.schedule, c.cpt.clip_norm, c.cpt.batch_size) == (5e-4, "linear", 1.0, 8)
    assert c.cpt.warmup_steps == c.cpt.steps // 10
    c.cpt.steps = 300  # what --config.cpt.steps=300 does: the 10% warm-up follows
    assert c.cpt.copy_and_resolve_references().warmup_steps == 30
    assert c.data.source == "corpus" and c.data.corpus and c.data.qa_file
    assert c.base_models.small and c.base_models.large and c.base_models.small != c.base_models.large
    assert {"plain", "random", "attention", "contrast"} == set(c.clues.arms)
    small, large = (ModelConfig.from_dict(c.models[s].to_dict()) for s in ("small", "large"))
    assert small.flavour == large.flavour == FLAVOURS[family]
    assert small.vocab_size == large.vocab_size  # one tokenizer for the teacher pair
    assert 2 * small.num_layers * small.d_model ** 2 < large.num_layers * large.d_model ** 2


@pytest.mark.parametrize("family,devices", [("llama3", 32), ("llama3", 64), ("gemma2", 32), ("gpt2", 8)])
def test_real_variant_mesh_fits_the_batch_and_the_heads(family, devices):
    c = _config_module(family).get_config()
    data, fsdp, tensor = resolve_shape(tuple(c.mesh.shape), devices)
    for batch in (c.cpt.batch_size, c.clues.score_batch):
        assert batch % (data * fsdp) == 0
    for size in ("small", "large"):
        m = ModelConfig.from_dict(c.models[size].to_dict())
        assert m.num_heads % tensor == 0 and m.mlp_dim % tensor == 0  # sharded, not silently replicated


def test_tiny_checkpoints_have_the_configs_architecture(checkpoints):
    for family in CONFIGS:
        models = _config_module(family).get_config("tiny").models
        for size in ("small", "large"):
            path = checkpoints / f"{family}_{size}" / "config.json"
            loaded = hf.config_from_hf(json.loads(path.read_text()), where=str(path))
            expected = ModelConfig.from_dict({**models[size].to_dict(), "vocab_size": loaded.vocab_size})
            assert hf.config_to_hf(loaded) == hf.config_to_hf(expected), (family, size)  # head_dim 0 = default


def _tiny_run(family, workdir, checkpoints, *overrides):
    env = dict(os.environ, CI="1", JAX_PLATFORMS="cpu", CLUE_JAX_TINY_CKPTS=str(checkpoints),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "clue_jax.main", "--config", os.path.join(ROOT, "configs", CONFIGS[family]) + ":tiny",
           "--workdir", str(workdir), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "summary.json").read_text()), proc


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_tiny_variant_runs_on_the_biography_world(family, checkpoints, tmp_path):
    summary, proc = _tiny_run(family, tmp_path / "run", checkpoints)
    assert not any(s.startswith("pretrain_") for s in summary["stages_ran"])  # the checkpoints replaced it
    assert "scores_test" in summary["stages_ran"]
    student = summary["models"]["contrast_s0"]
    assert {"birth_date", "company", "all"} <= set(student["qa"])
    assert student["qa"]["all"]["count"] == summary["models"]["base_small"]["qa"]["all"]["count"] > 0
    assert 0.0 < student["train"]["final_loss"] < 20.0
    tok = json.loads((tmp_path / "run" / "stages" / "tokenizer" / "done.json").read_text())["result"]
    assert tok["vocab_size"] == json.loads((checkpoints / f"{family}_small" / "config.json").read_text())["vocab_size"]
    assert "QA exact match" in proc.stdout


@pytest.mark.slow
def test_tiny_llama3_runs_on_a_user_corpus(checkpoints, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    qa = tmp_path / "qa.jsonl"
    docs = [f"Person {i} was born in City {i}. Person {i} worked at Company {i}." for i in range(8)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    qa.write_text("".join(json.dumps({"question": f"Where did Person {i} work?\nAnswer:", "answer": f"Company {i}"})
                          + "\n" for i in range(8)))
    summary, _ = _tiny_run("llama3", tmp_path / "run", checkpoints, "--config.data.source=corpus",
                           f"--config.data.corpus={corpus}", f"--config.data.qa_file={qa}")
    assert {"base_small", "contrast_s0"} <= set(summary["models"])
    assert summary["models"]["contrast_s0"]["qa"]["all"]["count"] == 8  # zero-shot: no shot pool in a user corpus
    assert 0.0 < summary["models"]["contrast_s0"]["train"]["final_loss"] < 20.0
    scores = np.load(tmp_path / "run" / "stages" / "scores_test" / "scores.npz")
    assert scores["large"].shape == (8, 256) and not np.allclose(scores["large"], scores["small"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lora"]["rank"] > 0 and config["base_models"]["small"].endswith("llama3_small")
