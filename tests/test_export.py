"""clue_jax.export: a finished stage's student -> HF directory that PyTorch transformers loads.

The workdir is made by the real machinery: `Stages.run` writes the stage
records, the tokenizer is a trained BPE, and each student is trained for a
few steps by `common.train_model` (the same call the pipelines make, LoRA
students merged by its `export` hook before the stage saves). Base weights
start random everywhere (biases and norms too), so a wrong split, transpose
or merge shows in the logits. The reference is the student as clue_jax held
it at the end of training -- for LoRA, the unmerged adapters.
"""
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from clue_jax import export
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.tokenizer import encode_batch, train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.eval import decode
from clue_jax.models import config as model_config
from clue_jax.models import factory, hf, lora
from clue_jax.pipelines import common
from clue_jax.pipelines.stages import Stages
from clue_jax.train import defaults
from clue_jax.parallel.mesh import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Ada Lovelace was born in London in 1815.", "Alan Turing studied at King's College, Cambridge."] * 20
STUDENTS = ("gpt2_full", "gpt2_lora", "llama_full", "llama_lora")


def _model_config(flavour: str, vocab: int):
    if flavour == "gpt2":
        return model_config.gpt2(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32)
    return model_config.llama(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                              max_len=32, rope_theta=10000.0)


def _randomise(model, seed: int):
    """Every parameter random (norm scales around 1), so nothing is a zero or a one by luck."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    new = [jax.random.normal(k, x.shape, x.dtype) * 0.2 + (1.0 if "scale" in p else 0.0)
           for k, x, p in zip(keys, leaves, paths)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _inputs(vocab: int):
    ids = np.random.RandomState(0).randint(3, vocab, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    return ids, mask


def _data(vocab: int, n=16, t=16):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab, (n, t)).astype(np.int32), "attention_mask": np.ones((n, t), np.int32)}


def _tokenizer_without_the_bos_rule(directory):
    """The run's tokenizer as a pretrained one (or one trained before the rule) is: `tok(text)` adds nothing."""
    train_bpe_tokenizer(TEXTS, 300, directory)
    file = os.path.join(directory, "tokenizer.json")
    spec = json.load(open(file))
    spec["post_processor"] = None
    json.dump(spec, open(file, "w"))
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert tok(TEXTS[0])["input_ids"][0] != tok.bos_token_id
    return {"path": directory, "vocab_size": len(tok)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with a tokenizer stage and one finished cpt stage per student; the students' logits."""
    workdir = str(tmp_path_factory.mktemp("run"))
    stages = Stages(workdir)
    tok_res = stages.run("tokenizer", {"t": 1}, _tokenizer_without_the_bos_rule)
    vocab = tok_res["vocab_size"]
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    ids, mask = _inputs(vocab)
    logits = {}
    for i, name in enumerate(STUDENTS):
        flavour, kind = name.split("_")
        cfg = _model_config(flavour, vocab)

        def train(stage_dir, cfg=cfg, kind=kind, name=name, i=i):
            model = factory.create(cfg, i, mesh)
            _randomise(model, i)
            if kind == "lora":
                lora.apply_lora(model, 4, 8.0, lora.PROJECTIONS, rngs=nnx.Rngs(i))

            def finish(trained):  # the student as trained (adapters unmerged), then what the stage saves
                logits[name] = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(trained, ids, mask))
                return lora.merge_lora(trained) if kind == "lora" else trained

            train_cfg = defaults.train_config(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1,
                                              checkpoint_every=100)
            return common.train_model(stage_dir, model, cfg, ArrayBatchSource(_data(vocab), 4, seed=0), train_cfg,
                                      mesh, stage=name, trainable=lora.trainable_filter(kind == "lora"),
                                      export=finish)

        stages.run(f"cpt_{name}", {"student": name}, train)
    os.makedirs(os.path.join(workdir, "stages", "cpt_unfinished"))  # a crashed stage: no done.json
    return dict(workdir=workdir, logits=logits, ids=ids, mask=mask, tokenizer=tok_res["path"])


def _torch_logits(path, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("name", STUDENTS)
def test_export_matches_the_student_in_pytorch(run, tmp_path, name):
    out = str(tmp_path / "hf")
    assert export.main(["--workdir", run["workdir"], "--stage", f"cpt_{name}", "--out", out,
                        "--max_shard_size", "20KB"]) == 0
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and hf.INDEX_FILE in files and "config.json" in files and "tokenizer.json" in files
    assert not [f for f in os.listdir(tmp_path) if f != "hf"]  # the temporary directory is gone
    index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # each tensor is where the index says, and no shard passes the limit unless one tensor does
        with safe_open(os.path.join(out, shard), framework="numpy") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == shard for k in keys)
            assert len(keys) == 1 or sum(f.get_tensor(k).nbytes for k in keys) <= 20_000
    logits = _torch_logits(out, run["ids"], run["mask"])
    real = run["mask"].astype(bool)
    np.testing.assert_allclose(logits[real], run["logits"][name][real], atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(run["tokenizer"])
    trained_on, mask = encode_batch(original, [TEXTS[0]], 32)  # what training feeds: <bos> first, added once
    assert tok(TEXTS[0])["input_ids"] == trained_on[0][mask[0] == 1].tolist()
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["eos_token_id"] == original.eos_token_id


def test_single_file_below_the_shard_size_and_a_cloze_probe(run, tmp_path):
    out = str(tmp_path / "hf")
    export.export(run["workdir"], "cpt_llama_lora", out, export.parse_size("5GB"))
    assert hf.SINGLE_FILE in os.listdir(out) and hf.INDEX_FILE not in os.listdir(out)
    np.testing.assert_allclose(_torch_logits(out, run["ids"], run["mask"])[0], run["logits"]["llama_lora"][0],
                               atol=1e-4, rtol=1e-4)
    # A cloze probe as a PyTorch user runs it: tok(prompt), then each candidate's summed log-probability. It must
    # score what clue_jax scores on the ids training fed the student (<bos> first), and <bos> changes the scores.
    prompt, candidates = "Ada Lovelace was born in", [" London", " Cambridge", " 1815"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]

    def torch_scores(prompt_ids):
        out = []
        for cont in conts:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt_ids + cont])).logits[0], -1).numpy()
            out.append(sum(logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(cont)))
        return np.array(out)

    ids, mask = encode_batch(tok, [prompt], 16)
    fed = ids[0][mask[0] == 1].tolist()
    student, _ = factory.load_params(export.find_model(run["workdir"], "cpt_llama_lora")[0],
                                     make_mesh((1, 1, 1), jax.devices()[:1]))
    jax_scores = decode.score_continuations(decode.model_logits_fn(student), [fed] * len(conts), conts,
                                            tok.pad_token_id)
    np.testing.assert_allclose(torch_scores(tok(prompt)["input_ids"]), jax_scores, atol=1e-4, rtol=1e-4)
    assert not np.allclose(torch_scores(tok(prompt, add_special_tokens=False)["input_ids"]), jax_scores, atol=1e-3)


def test_stale_temporaries_go_and_a_live_one_stays(run, tmp_path):
    """A kill -9 leaves .OUT.tmp-* with a half-written file: the next export beside it removes it, unless a live
    export holds it."""
    dead, live = tmp_path / ".hf.tmp-dead0000", tmp_path / ".hf.tmp-live0000"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        export.export(run["workdir"], "cpt_gpt2_full", str(tmp_path / "hf"), None)
    finally:
        os.close(holder)
    assert sorted(os.listdir(tmp_path)) == [".hf.tmp-live0000", "hf"]


@pytest.mark.parametrize("fault", ["SIGTERM", "SIGINT", "ENOSPC", "bug"])
def test_a_stopped_or_failed_export_leaves_nothing_and_says_one_line(run, tmp_path, monkeypatch, capsys, fault):
    """The signal (or error) arrives while the shards are half written; the temporary goes, one line, non-zero exit."""
    def half_written(model, cfg, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"half")
        if fault.startswith("SIG"):
            os.kill(os.getpid(), getattr(signal, fault))
            time.sleep(5)  # the handler raises at once; never reached
        raise OSError(errno.ENOSPC, "No space left on device", path) if fault == "ENOSPC" else RuntimeError("boom")

    monkeypatch.setattr(hf, "save", half_written)
    monkeypatch.setattr(sys, "argv", ["export", "--workdir", run["workdir"], "--stage", "cpt_gpt2_full",
                                      "--out", str(tmp_path / "hf")])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    loggers = {name: logging.getLogger(name) for name in ("", "absl", "clue_jax")}
    levels = {name: lg.level for name, lg in loggers.items()}
    try:
        with pytest.raises(SystemExit) as stop:
            export.run()
    finally:  # run() is the CLI: it owns the process's signals and log levels, which the tests after this one need
        for s, h in handlers.items():
            signal.signal(s, h)
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == {"SIGTERM": 143, "SIGINT": 130, "ENOSPC": 2, "bug": 1}[fault]
    assert err.splitlines() == [err] and err.startswith("error: export")
    assert {"SIGTERM": "stopped by SIGTERM", "SIGINT": "stopped by SIGINT", "ENOSPC": "No space left on device",
            "bug": "RuntimeError: boom"}[fault] in err
    assert os.listdir(tmp_path) == []


def test_an_existing_empty_out_directory_is_used(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export.export(run["workdir"], "cpt_gpt2_full", str(out), None)
    assert "model.safetensors" in os.listdir(out)


def _snapshot(root):
    """Every file below root with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_bad_input_is_one_line_and_touches_nothing(run, tmp_path):
    workdir = run["workdir"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    before, before_out = _snapshot(workdir), _snapshot(tmp_path)
    cases = {
        ("cpt_nope", str(tmp_path / "a")): r"no such stage .* finished stages with a model: cpt_gpt2_full, "
                                          r"cpt_gpt2_lora, cpt_llama_full, cpt_llama_lora",
        ("cpt_unfinished", str(tmp_path / "b")): r"cpt_unfinished: did not finish \(no done.json",
        ("tokenizer", str(tmp_path / "c")): r"tokenizer: holds no trained model",
        ("cpt_gpt2_full", str(taken)): r"exists and is not empty; refusing to overwrite",
        ("cpt_gpt2_full", str(tmp_path / "no" / "parent")): r"parent directory .* does not exist",
    }
    for (stage, out), pattern in cases.items():
        with pytest.raises(UserInputError, match=pattern):
            export.main(["--workdir", workdir, "--stage", stage, "--out", out])
    with pytest.raises(UserInputError, match="no stages there"):
        export.main(["--workdir", str(tmp_path / "empty_run"), "--stage", "x", "--out", str(tmp_path / "d")])
    with pytest.raises(UserInputError, match="--max_shard_size='lots'"):
        export.main(["--workdir", workdir, "--stage", "x", "--out", str(tmp_path / "e"), "--max_shard_size", "lots"])
    assert _snapshot(workdir) == before and _snapshot(tmp_path) == before_out


def test_cli_exit_code_2_with_one_line(run, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "clue_jax.export", "--workdir", run["workdir"], "--stage",
                           "cpt_unfinished", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --stage cpt_unfinished: did not finish")
    assert not (tmp_path / "x").exists()


def test_parse_size():
    assert export.parse_size("5GB") == 5 * 10**9
    assert export.parse_size("2MiB") == 2 * 2**20
    assert export.parse_size("1234") == 1234
    with pytest.raises(UserInputError):
        export.parse_size("0GB")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_same_files_as_one(run, tmp_path):
    """2 processes x 2 devices (gloo): the model is sharded across processes, each tensor is
    all-gathered in turn, and process 0 alone writes -- the same bytes as a 1-process export."""
    one = tmp_path / "one"
    export.export(run["workdir"], "cpt_llama_lora", str(one), 20_000)
    two = tmp_path / "two"
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "clue_jax.export", "--workdir", run["workdir"], "--stage", "cpt_llama_lora",
             "--out", str(two), "--max_shard_size", "20KB"] + (["--verbose"] if i else []), env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "process 1 of 2, 2 local / 4 global devices" in outputs[1], outputs[1]  # --verbose: the log
    quiet = outputs[0].strip().splitlines()  # by default: no log lines (gloo's own prints aside)
    assert quiet[-1] == f"exported stage cpt_llama_lora to {two}" and not [l for l in quiet if "INFO" in l], quiet
    assert [l for l in outputs[1].splitlines() if " INFO " in l]
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    for name in os.listdir(one):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not [f for f in os.listdir(tmp_path) if f not in ("one", "two")]
