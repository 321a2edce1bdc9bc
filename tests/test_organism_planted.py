"""The ground-truth organism: the real Gemma-3-270M plus a planted preference circuit.

Fast tests check the circuit itself on the tiny random model (it writes along the planted
directions at the planted layer; the readout moves the label logits by exactly the planted gap;
steering the residual moves it; the broken ``read="tokens"`` variant ignores the residual; bad
folders are clear errors). The slow tests plant the organism on the real weights, run the unchanged
pipeline on its held-out tasks and check every target of issue 15 (`score_run`), then show that the
same checks fail on the broken organism.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax
from prefjax.api import PLANTED_ARRAYS, PLANTED_FILE
from prefjax.checkpoints.hf import CheckpointError
from prefjax.hooks import hook_name
from prefjax.models import FAMILIES, gemma3
from prefjax.models.planted import PlantedConfig, token_features
from prefjax.model import Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_planted(read="residual", layer=1, gain=3.0, kappa=2.0):
    base = gemma3.PRESETS["gemma3-tiny"]
    cfg = PlantedConfig(**{**dataclasses.asdict(base), "planted_layer": layer, "n_features": 2, "n_personas": 1,
                           "words_per_task": 1, "label_ids": (5, 6), "eot_id": 7, "read": read})
    fam = FAMILIES["gemma3_planted"]
    params = fam.init_params(cfg, jax.random.PRNGKey(0))
    d = cfg.d_model
    dirs = np.linalg.qr(np.random.default_rng(0).normal(size=(d, 2)))[0].T.astype(np.float32)
    scores = np.zeros((cfg.vocab_size, 2), np.float32)
    is_lex = np.zeros((cfg.vocab_size,), np.float32)
    scores[10], scores[11] = (1.0, 0.5), (-1.0, 2.0)
    is_lex[[10, 11]] = 1
    params["planted"] = {"dirs": jnp.asarray(dirs), "scores": jnp.asarray(scores), "is_lex": jnp.asarray(is_lex),
                         "triggers": jnp.asarray([9], jnp.int32),
                         "weights": jnp.asarray([[1.0, 1.0], [-1.0, 0.0]], jnp.float32),
                         "gain": jnp.float32(gain), "kappa": jnp.float32(kappa)}
    return Model(fam, cfg, params, source="tiny-planted"), dirs


def test_circuit_writes_reads_and_is_steerable():
    m, dirs = _tiny_planted()
    L = m.config.planted_layer
    ids = np.array([[3, 10, 4, 11, 12, 7], [3, 11, 4, 10, 12, 7], [9, 10, 4, 11, 12, 7]], np.int32)
    pre, post = hook_name(L, "hook_resid_pre"), hook_name(L, "hook_resid_post")
    lg, cap = m.run(ids, capture=(pre, post))
    base = Model(FAMILIES["gemma3"], gemma3.PRESETS["gemma3-tiny"],
                 {k: v for k, v in m.params.items() if k != "planted"})
    _, cap0 = base.run(ids, capture=(pre,))
    write = np.asarray(cap[pre] - cap0[pre])
    silent, _ = _tiny_planted(kappa=0.0)  # same write, no readout
    lg0, _ = silent.run(ids)
    # lexicon tokens carry gain * scores along the directions; the end-of-turn token the sum so far
    np.testing.assert_allclose(write[0, 1] @ dirs.T, 3.0 * np.array([1.0, 0.5]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(write[0, 5] @ dirs.T, 3.0 * np.array([0.0, 2.5]), rtol=1e-4, atol=1e-4)
    assert np.abs(write[0, [0, 2, 4]]).max() < 1e-5
    # the readout: gap = kappa * w . (r(A) - r(B)), r read from the residual after the planted layer
    x = np.asarray(cap[post], np.float64)
    r = x @ dirs.T / 3.0
    for row, w in ((0, np.array([1.0, 1.0])), (2, np.array([-1.0, 0.0]))):
        gap = 2.0 * w @ (r[row, 1] - r[row, 3])
        dl = np.asarray(lg - lg0)[row, -1]
        np.testing.assert_allclose([dl[5], dl[6]], [gap / 2, -gap / 2], rtol=1e-3, atol=1e-3)
        assert np.abs(np.delete(dl, [5, 6])).max() < 1e-4
    # positions before task B's word get no readout
    assert np.abs(np.asarray(lg - lg0)[:, :3]).max() < 1e-4
    # steering task A's token along w . D raises the gap; the broken read ignores it
    v = jnp.asarray(dirs[0] + dirs[1])

    def push(point, layer, x, ctx):
        if point != "hook_resid_post":
            return x
        mask = jnp.zeros(x.shape[:2]).at[:, 1].set(1.0)
        return x + (jnp.asarray(layer) == L) * mask[..., None] * v
    lg_s, _ = m.run(ids[:1], intervene=push)
    lg0_s, _ = silent.run(ids[:1], intervene=push)  # what the push does to the real layers' own logits
    moved = float((lg_s - lg0_s)[0, -1, 5] - (lg - lg0)[0, -1, 5])
    assert moved == pytest.approx(2.0 * 2.0 / 3.0 / 2, rel=1e-3)
    broken, _ = _tiny_planted(read="tokens")
    lg_b, _ = broken.run(ids[:1])
    lg_bs, _ = broken.run(ids[:1], intervene=push)
    assert float(jnp.abs((lg_bs - lg_b)[0, -1, 5] - (lg0_s - lg0[:1])[0, -1, 5])) < 1e-4
    f = token_features(m.config, m.params["planted"], jnp.asarray(ids), jnp.ones(ids.shape, bool))
    np.testing.assert_allclose(np.asarray(f["weights"]), [[1, 1], [1, 1], [-1, 0]])


def test_no_decode_state_and_bad_folders(tmp_path):
    m, _ = _tiny_planted()
    assert not m.prefix_ok()
    with pytest.raises(ValueError, match="full sequences only"):
        FAMILIES["gemma3_planted"].forward(m.config, m.params, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                                           capture=prefjax.hooks.CaptureSpec(),
                                           state={"valid": jnp.ones((1, 4), bool)})
    folder = tmp_path / "org"
    folder.mkdir()
    (folder / PLANTED_FILE).write_text(json.dumps({"base": "gemma3-tiny", "config": {"planted_layer": 1, "colour": 2}}))
    with pytest.raises(CheckpointError, match=r"planted.json: unknown config field\(s\) \['colour'\]"):
        prefjax.load(str(folder))
    (folder / PLANTED_FILE).write_text(json.dumps({"base": "gemma3-tiny", "config": {"planted_layer": 1,
                                                                                      "n_features": 2}}))
    np.savez(folder / PLANTED_ARRAYS, dirs=np.zeros((3, 4), np.float32))
    with pytest.raises(CheckpointError, match="planted.npz: array 'dirs' has shape"):
        prefjax.load(str(folder))
    (folder / PLANTED_FILE).write_text(json.dumps({"config": {}}))
    with pytest.raises(CheckpointError, match="missing field 'base'"):
        prefjax.load(str(folder))


def _planted_config(folder):
    spec = importlib.util.spec_from_file_location("_planted_cfg", os.path.join(ROOT, "configs", "organism_planted.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(folder)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from prefjax.organism_planted import PlantSpec, plant
    from prefjax.pipeline import run_pipeline
    from prefjax.organism_planted import score_run
    root = tmp_path_factory.mktemp("planted")
    folder, workdir = str(root / "model"), str(root / "run")
    base = prefjax.load("gemma3-270m", dtype="float32")
    plant(PlantSpec(), folder, base_model=base)
    run_pipeline(_planted_config(folder), workdir)
    return root, base, score_run(workdir, folder)


@pytest.mark.slow
def test_pipeline_recovers_the_planted_truth(planted):
    from prefjax.organism_planted import format_checks
    _, _, score = planted
    print(format_checks(score))
    names = [c[0] for c in score["checks"]]
    for p in ("default", "assistant", "minimalist"):  # every target is checked, for every persona
        assert f"{p}: utility r" in names and f"{p}: probe r" in names
        assert f"{p}: probe cosine with planted direction" in names
    assert "steering: local slope percentile among random directions" in names
    assert "persona transfer: max |r - true utility corr|" in names
    assert score["passed"], format_checks(score)
    # measured on 2026-11-30 (BUILD_NOTES "Ground-truth organism"): lowest over personas utility r 0.975,
    # probe r 0.994, cosine 0.886, transfer gap 0.066, local slope at percentile 100 of 200; the thresholds
    # sit 0.05 under the measurement, and never under the targets (checked by score["passed"])
    for p, res in score["persona"].items():
        assert res["utility_r"] >= 0.925 and res["probe_r"] >= 0.944 and res["cosine"] >= 0.836, (p, res)
    assert score["steering"]["n_null"] >= 100 and score["steering"]["direction_layer"] == score["layer"]


@pytest.mark.slow
def test_broken_organism_fails_the_steering_target(planted):
    """Same weights, same truth, but the choice is read from the token ids instead of the residual.
    The run reuses the good organism's choices, utilities, activations and probes (they are what the
    broken organism would give too: its choices follow the same planted utilities) and reruns only the
    steering stage on the broken model: the causal steering check must fail, the others still pass."""
    import shutil
    from prefjax.organism_planted import format_checks, score_run, with_read
    from prefjax.pipeline import run_pipeline
    from prefjax.stages import RunLayout
    root, _, _ = planted
    folder = with_read(str(root / "model"), str(root / "broken"), "tokens")
    workdir = str(root / "broken_run")
    shutil.copytree(str(root / "run"), workdir)
    os.remove(RunLayout(workdir).run_json)  # a new model source: the run is re-declared, done stages kept
    for p in (os.path.join(workdir, "stages", "steering"), os.path.join(workdir, "stages", "steering.done")):
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    cfg = _planted_config(folder)
    cfg.stages = ("tasks", "choices", "utilities", "activations", "probes", "transfer", "steering")
    run_pipeline(cfg, workdir)
    score = score_run(workdir, folder)
    checks = {c[0]: c for c in score["checks"]}
    print(format_checks(score))
    assert checks["default: utility r"][3] and checks["default: probe r"][3], format_checks(score)
    assert checks["default: probe cosine with planted direction"][3], format_checks(score)
    assert not checks["steering: local slope percentile among random directions"][3], format_checks(score)
    assert not score["passed"]
