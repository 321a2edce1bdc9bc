"""Model organism: planted preferences must be recovered by the unchanged pipeline.

The slow test plants a small organism (600 optax steps on the CPU, frozen projected Gemma-3-270M
embedding), runs ``run_pipeline`` with ``configs/organism.py:small`` on the 136 held-out tasks and
checks recovery against the hidden utilities. Thresholds come from measured values (see the
comments) with a margin; a change that breaks the statistics, the prompts, the activation plumbing
or the steering hook makes at least one of them fail.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from prefjax import organism as O

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _organism_config(arg):
    spec = importlib.util.spec_from_file_location("_organism_cfg", os.path.join(ROOT, "configs", "organism.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.get_config(arg)


def test_spec_roundtrip_and_validation():
    spec = O.OrganismSpec(personas=(O.PersonaTransform("default"), O.PersonaTransform("evil", -1.0,
                                                                                      (("coding", 0.5),))))
    assert O.OrganismSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="content_feature"):
        O.OrganismSpec(content_feature="vibes")
    with pytest.raises(ValueError, match="unknown OrganismSpec fields"):
        O.OrganismSpec.from_dict({"stepz": 3})
    mod, cfg = _organism_config("small:/tmp/x")
    assert mod.spec_from_config(cfg.organism).steps == 600
    assert cfg.model.source == "/tmp/x" and cfg.tasks.source == "/tmp/x/eval_tasks.jsonl"


def test_hidden_utilities_transform_and_split():
    from prefjax.tasks import load_default_pool
    pool = load_default_pool()
    spec = O.OrganismSpec(personas=(O.PersonaTransform("default"), O.PersonaTransform("evil", -1.0,
                                                                                      (("math", 2.0),))))
    z = np.linspace(-1, 1, len(pool))
    u = O.hidden_utilities(spec, pool, z)
    is_math = np.array([t.topic == "math" for t in pool])
    np.testing.assert_allclose(u["evil"], -u["default"] + 2.0 * is_math)
    train, ev = O.split_tasks(pool, 0.6, 0)
    assert not set(train.ids) & set(ev.ids) and len(train) + len(ev) == len(pool)
    assert set(ev.topics) == set(pool.topics)  # stratified: every topic is evaluated


def test_checkpoint_roundtrip(tmp_path):
    """save_checkpoint -> prefjax.load gives back the same parameters and the same logits."""
    import prefjax
    from prefjax.checkpoints.gguf import default_gguf_path
    from prefjax.models import gemma3
    from prefjax.tokenize import Tokenizer
    spec = O.OrganismSpec(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    cfg = O.organism_config(spec)
    params = gemma3.init_params(cfg, jax.random.PRNGKey(3))
    tok = Tokenizer.from_gguf(default_gguf_path())
    O.save_checkpoint(str(tmp_path), cfg, params, tok)
    m = prefjax.load(str(tmp_path))
    assert m.config.layer_types == cfg.layer_types and m.config.n_kv_heads == 1
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(m.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.asarray([tok.encode("Task A or Task B?")], np.int32)
    ref = gemma3.forward(cfg, params, ids, np.ones_like(ids), capture=__import__("prefjax.hooks").hooks
                         .CaptureSpec.from_names((), cfg.n_layers))[0]
    np.testing.assert_allclose(np.asarray(m.run(ids)[0]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert m.tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == \
        tok.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_pipeline_recovers_planted_preferences(tmp_path):
    from prefjax.pipeline import run_pipeline
    model_dir = str(tmp_path / "model")
    mod, cfg = _organism_config("small:" + model_dir)
    cfg.progress = False
    info = O.plant_organism(mod.spec_from_config(cfg.organism), model_dir, verbose=False)
    run_pipeline(cfg, str(tmp_path / "run"))
    rec = O.evaluate_recovery(str(tmp_path / "run"), model_dir)
    print(json.dumps({"train": {k: v for k, v in info.items() if k != "losses"}, "recovery": rec}, indent=1))
    assert rec["train_tasks_in_run"] == 0
    # Training: the loss must fall towards the soft targets' entropy floor.
    assert np.mean(info["losses"][-50:]) < np.mean(info["losses"][:50]) - 0.05
    assert info["eval"]["r"] > THRESH["pair_r"]
    for p in ("default", "evil"):
        r = rec["persona"][p]
        assert r["utility_r"] > THRESH["utility_r"], (p, r)
        assert r["probe_r_hidden"] > THRESH["probe_r_hidden"], (p, r)
    # evil = -default: a probe trained on one persona must not transfer positively to the other.
    tr = np.asarray(rec["transfer"]["persona_r"])
    assert max(tr[0, 1], tr[1, 0]) < THRESH["transfer_max"], tr
    assert min(tr[0, 1], tr[1, 0]) < THRESH["transfer_min"], tr
    assert rec["transfer"]["utility_corr"][0][1] < THRESH["utility_corr_max"]
    # Steering, direction from the probe at the steering layer (layer 0): its local slope lies outside
    # the null of 1,000 random directions. The SIGN is not asserted: nothing in this organism's training
    # ties the end-of-turn direction to what the model reads on the task span (issue 15: the layer-0
    # probe is anti-aligned with the slope gradient).
    st = rec["steering"]
    assert st["direction_layer"] == st["layer"] == 0
    assert st["local_slope"]["n_null"] >= 100 and st["local_slope"]["p_two_sided"] <= THRESH["steer_null_p"], st


# Measured on the 2-core CPU sandbox, 2026-11-27 (seed 0, 600 steps): held-out pair r 0.547;
# utility r 0.667 (default) / 0.637 (evil); probe r vs hidden 0.641 / 0.594; transfer r
# default->evil -0.80, evil->default -0.07; utility corr -0.885; steering slope probe -0.052 vs
# random -0.0057 (ratio 9.2; that was the layer-1 probe added at layer 0). Thresholds sit ~0.2 below.
# 2026-11-30, direction from the matching layer-0 probe: finite slopes -0.043 (probe) vs -0.017 (one random
# direction); local slope at percentile 0.0 of 1,000 random directions, two-sided p = 1/1001 (the
# smallest possible): the null threshold 0.01 is ten times that.
THRESH = {"pair_r": 0.35, "utility_r": 0.45, "probe_r_hidden": 0.4, "transfer_max": 0.2, "transfer_min": -0.4,
          "utility_corr_max": -0.7, "steer_null_p": 0.01}


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
from prefjax import organism as O
from test_organism import tiny_training_inputs
real_save = O.TrainingCheckpoints.save
def save(self, step, state, meta):
    if step == 6:  # killed (SIGKILL: no cleanup) after step 6 ran, before its checkpoint was written
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, step, state, meta)
O.TrainingCheckpoints.save = save
spec, args = tiny_training_inputs()
O.train_organism(spec, *args, verbose=False, checkpoint_dir={ckpt!r}, checkpoint_every=2)
"""


def tiny_training_inputs():
    """A 10-step organism training problem (random embedding, 40 tasks) that runs in seconds."""
    from prefjax.checkpoints.gguf import default_gguf_path
    from prefjax.tasks import load_default_pool
    from prefjax.tokenize import Tokenizer
    spec = O.OrganismSpec(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                          embed_init="random", n_tasks=40, steps=10, batch_size=4, warmup=2, bucket=64)
    pool = load_default_pool().subset(40, seed=0, stratified=True)
    tok = Tokenizer.from_gguf(default_gguf_path())
    embed = O.organism_embedding(spec)
    util = O.hidden_utilities(spec, pool, O.content_feature(spec, embed, tok, pool))
    return spec, (embed, tok, pool, util)


@pytest.mark.slow
def test_training_resumes_after_a_kill(tmp_path):
    """Killed mid-training (SIGKILL in a subprocess), the same call resumes from the orbax checkpoint
    and ends with the parameters and loss curve of an uninterrupted run."""
    import subprocess
    import sys
    ckpt = str(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=ROOT, ckpt=ckpt)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == -9, r.stderr[-2000:]
    assert O.TrainingCheckpoints(ckpt).latest_step() == 4  # step 6 never reached the disk
    spec, args = tiny_training_inputs()
    ref_params, ref = O.train_organism(spec, *args, verbose=False)
    params, info = O.train_organism(spec, *args, verbose=False, checkpoint_dir=ckpt, checkpoint_every=2)
    assert info["resumed_from"] == 4 and ref["resumed_from"] is None
    np.testing.assert_allclose(info["losses"], ref["losses"], rtol=1e-6, atol=0)
    assert len(info["losses"]) == spec.steps
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert O.TrainingCheckpoints(ckpt).latest_step() == spec.steps
    with pytest.raises(ValueError, match="different OrganismSpec"):
        O.train_organism(dataclasses.replace(spec, lr=1e-3), *args, verbose=False, checkpoint_dir=ckpt)
