"""Experiments: end-of-turn patching, preference-shift tracking, true/false discrimination."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

import prefjax
from prefjax.elicit import personas_from_spec
from prefjax.experiments.patching import (ChoicePrompt, PatchError, choice_prompt, patch_intervention,
                                          patching_curves, run_patching_stage)
from prefjax.experiments.pref_shift import ShiftError, correlation_test, preference_shift, run_pref_shift_stage
from prefjax.experiments.truefalse import (TrueFalseError, auc, cv_classifier_auc, load_statements,
                                           run_truefalse_stage, statement_activations, stratified_folds)
from prefjax.runconfig import RunConfig
from prefjax.tasks import load_default_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOOKS = tuple(f"blocks.{l}.hook_resid_post" for l in range(4))


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny-tok")


@pytest.fixture(scope="module")
def personas():
    return {p.name: p for p in personas_from_spec(["default", "evil"])}


@pytest.fixture(scope="module")
def pool():
    return load_default_pool().subset(14, seed=0)


@pytest.fixture(scope="module")
def tiny_run(model, pool, personas, tmp_path_factory):
    """A workdir laid out as the pipeline writes it: utilities, activations, one probe per persona."""
    from prefjax.activations import extract
    from prefjax.probes import fit_ridge
    from prefjax.stages import Run, atomic_save_npz
    wd = tmp_path_factory.mktemp("run")
    from configs.common import base_config
    c = RunConfig.from_config(base_config("tiny", "tests/test_experiments.py"))
    cfg = dataclasses.replace(
        c, seed=0, activations=dataclasses.replace(c.activations, layers="all"),
        patching=dataclasses.replace(c.patching, n_pairs=2, min_effect=0.0, layers=""),
        pref_shift=dataclasses.replace(c.pref_shift, n_boot=200, n_perm=200),
        truefalse=dataclasses.replace(c.truefalse, n_boot=100, n_folds=4))
    run = Run(str(wd), cfg.to_dict())
    rng = np.random.default_rng(0)
    summary = {"persona": {}}
    for k, name in enumerate(personas):
        st = extract(model, pool, run.activations_dir(name), hooks=list(HOOKS),
                     persona=personas[name], batch_size=14)
        X = st.read(hook=HOOKS[2])[:, 0, :]
        mu = X @ rng.standard_normal(X.shape[1]) + 0.1 * rng.standard_normal(len(pool))
        atomic_save_npz(run.utilities(name), mu=mu, sigma=np.ones_like(mu))
        probe = fit_ridge(X, mu, alphas=(1.0, 10.0), eval_idx=np.arange(9, 14), train_idx=np.arange(9))
        probe.save(run.probe_dir(name, 2), hook=HOOKS[2], layer=2, position=0)
        summary["persona"][name] = {"best_layer": 2}
    return run, cfg, summary


# ---------------------------------------------------------------------------------------------
# Patching

def _prompts(model, personas):
    pool = load_default_pool()
    a, b = pool[0], pool[5]
    p = personas["default"]
    return choice_prompt(model, a, b, p), choice_prompt(model, b, a, p), choice_prompt(model, a, b, personas["evil"])


def test_patch_intervention_validation():
    vals = np.zeros((1, 2, 1, 8), np.float32)
    pos = np.array([[3], [4]])
    patch_intervention([1], pos, vals, n_layers=4, seq_len=10)  # fine
    with pytest.raises(PatchError, match=r"layer\(s\) \[4\]"):
        patch_intervention([4], pos, vals, n_layers=4)
    with pytest.raises(PatchError, match="twice"):
        patch_intervention([1, 1], pos, np.zeros((2, 2, 1, 8)))
    with pytest.raises(PatchError, match=r"\[batch, k\]"):
        patch_intervention([1], np.array([3, 4]), vals)
    with pytest.raises(PatchError, match="position 12 .example 1, slot 0."):
        patch_intervention([1], np.array([[3], [12]]), vals, seq_len=10)
    with pytest.raises(PatchError, match=r"values must be \[layers=1, batch=2, k=1, d\]"):
        patch_intervention([1], pos, np.zeros((1, 2, 2, 8)))
    with pytest.raises(PatchError, match="repeat"):
        patch_intervention([1], np.array([[3, 3], [1, 2]]), np.zeros((1, 2, 2, 8)))
    with pytest.raises(PatchError, match="unknown patch point"):
        patch_intervention([1], pos, vals, point="hook_resid_late")
    with pytest.raises(PatchError, match="NaN"):
        patch_intervention([1], pos, np.full((1, 2, 1, 8), np.nan))


def test_choice_prompt_span(model, personas):
    tgt, src, _ = _prompts(model, personas)
    tok = model.tokenizer
    assert tgt.ids[tgt.eot] == tok.end_of_turn_id
    assert tok.decode(tgt.ids[tgt.eot:tgt.span_end], skip_special_tokens=False) == \
        "<end_of_turn>\n<start_of_turn>model\n"
    assert tok.decode(tgt.ids[tgt.span_end:], skip_special_tokens=False).strip() == "Task"
    assert tgt.shown == src.shown[::-1]


def test_self_patch_is_bit_exact(model, personas):
    tgt, src, other = _prompts(model, personas)
    # a batch of self-pairs: patching any layer, eot or the whole span, gives P_patched == P_target exactly
    res = patching_curves(model, [(tgt, tgt), (other, other)], [0, 1, 2, 3], modes=("eot", "span"))
    for m in ("eot", "span"):
        assert res["p_patched"][m].shape == (4, 2)
        np.testing.assert_array_equal(res["p_patched"][m], np.broadcast_to(res["p_target"], (4, 2)))
        np.testing.assert_array_equal(res["ld_patched"][m], np.broadcast_to(res["ld_target"], (4, 2)))
    np.testing.assert_array_equal(res["p_source"], res["p_target"])
    # the keep mask: slots switched off leave the activation untouched, bit for bit
    ids = np.asarray([tgt.ids], np.int32)
    pos = np.asarray([[tgt.eot, tgt.eot + 1]], np.int32)
    base, cache = model.run(ids, capture=HOOKS[1:2], positions=pos)
    junk = np.full((1, 1, 2, model.d_model), 7.0, np.float32)
    iv = patch_intervention([1], pos, junk, keep_BxK=np.zeros((1, 2), bool), n_layers=4, seq_len=ids.shape[1])
    lg, got = model.run(ids, capture=HOOKS[1:2], positions=pos, intervene=iv)
    assert np.array_equal(np.asarray(lg), np.asarray(base))
    iv = patch_intervention([1], pos, junk, keep_BxK=np.array([[False, True]]))
    _, got = model.run(ids, capture=HOOKS[1:2], positions=pos, intervene=iv)
    got = np.asarray(got[HOOKS[1]])
    np.testing.assert_array_equal(got[0, 0], np.asarray(cache[HOOKS[1]])[0, 0])
    np.testing.assert_array_equal(got[0, 1], junk[0, 0, 1])


def test_patch_all_positions_reproduces_source(model):
    tok = model.tokenizer
    a = tok.encode_chat([{"role": "user", "content": "Write a short poem about cats."}])
    b = tok.encode_chat([{"role": "user", "content": "Write a short poem about dogs."}])
    assert len(a) == len(b) and a != b
    ids = np.asarray([a, b], np.int32)  # row 0 target, row 1 source
    t = ids.shape[1]
    allpos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
    lg, cache = model.run(ids, capture=HOOKS)
    lg = np.asarray(lg)
    assert np.abs(lg[0] - lg[1]).max() > 1e-3  # the prompts really differ
    for l in (0, 3):  # every position at one layer: everything downstream is the source's
        src = np.asarray(cache[HOOKS[l]])[1]
        iv = patch_intervention([l], allpos, np.stack([src, src])[None], n_layers=4, seq_len=t)
        got = np.asarray(model.run(ids, intervene=iv)[0])
        np.testing.assert_allclose(got[0], lg[1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[1], lg[1], atol=1e-5, rtol=0)


def test_patching_curves_recovered_and_errors(model, personas):
    tgt, src, other = _prompts(model, personas)
    res = patching_curves(model, [(tgt, src), (tgt, other)], [0, 1, 2, 3], min_effect=0.0)
    eff = res["p_source"] - res["p_target"]
    assert np.abs(eff).max() > 0
    rec = res["recovered"]["span"]
    assert rec["pooled"].shape == (4,) and rec["n_used"] == 2
    moved = res["p_patched"]["span"] - res["p_target"]
    np.testing.assert_allclose(rec["pooled"], moved @ eff / (eff @ eff))
    np.testing.assert_allclose(rec["mean"], (moved / eff).mean(1))
    # patching the eot token at the last layer cannot reach the last token's logits
    np.testing.assert_allclose(res["p_patched"]["eot"][3], res["p_target"], atol=1e-6, rtol=0)
    bad = ChoicePrompt(tgt.ids, tgt.eot, tgt.span_end - 1, "x", tgt.shown)
    with pytest.raises(PatchError, match="pair 0 .*spans differ in length"):
        patching_curves(model, [(tgt, bad)], [0])
    with pytest.raises(PatchError, match="unknown patch mode"):
        patching_curves(model, [(tgt, src)], [0], modes=("all",))
    with pytest.raises(Exception, match="layers 0..3"):
        patching_curves(model, [(tgt, src)], [7])


def test_patching_stage(model, pool, personas, tiny_run):
    run, cfg, _ = tiny_run
    out = run_patching_stage(cfg.patching, run, model, pool, personas, activation_layers=cfg.activations.layers,
                             seed=cfg.seed)
    json.dumps(out)
    assert out["layers"] == [0, 1, 2, 3] and out["n_pairs"] == 2
    for kind in ("swap", "persona"):
        s = out["sources"][kind]
        assert len(s["recovered"]["eot"]["pooled"]) == 4 and len(s["recovered_logit"]["span"]["mean"]) == 4
        z = np.load(os.path.join(run.stage_dir("patching"), f"{kind}.npz"))
        assert z["p_patched_span"].shape == (4, 2)
    assert out["sources"]["persona"]["source_persona"] == "evil"
    assert "recovered_task_frame" not in out["sources"]["persona"]
    z = np.load(os.path.join(run.stage_dir("patching"), "swap.npz"))
    moved, eff = z["p_patched_eot"] - z["p_target"], (1 - z["p_source"]) - z["p_target"]
    np.testing.assert_allclose(out["sources"]["swap"]["recovered_task_frame"]["eot"]["p"]["pooled"],
                               moved @ eff / (eff @ eff))


# ---------------------------------------------------------------------------------------------
# Preference shift

def test_correlation_test_tracks_and_nulls():
    from scipy import stats
    rng = np.random.default_rng(0)
    d_mu = rng.standard_normal(120)
    d_s = d_mu + 0.3 * rng.standard_normal(120)
    res = correlation_test(d_s, d_mu, n_boot=500, n_perm=500, seed=1)
    assert res["r"] == pytest.approx(stats.pearsonr(d_s, d_mu)[0], abs=1e-12)
    assert res["spearman"] == pytest.approx(stats.spearmanr(d_s, d_mu)[0], abs=1e-12)
    assert res["r"] > 0.9 and res["ci"][0] > 0.85 and res["ci"][0] < res["r"] < res["ci"][1]
    assert res["p_value"] == pytest.approx(1 / 501) and res["slope"] == pytest.approx(1.0, abs=0.1)
    ind = correlation_test(rng.standard_normal(120), d_mu, n_boot=500, n_perm=500, seed=1)
    assert abs(ind["r"]) < 0.2 and ind["p_value"] > 0.05 and ind["ci"][0] < 0 < ind["ci"][1]


def test_preference_shift_synthetic():
    rng = np.random.default_rng(3)
    n = 80
    content = rng.standard_normal(n)
    mu_b = content + 0.5 * rng.standard_normal(n)
    mu_s = mu_b + rng.standard_normal(n)  # the shift
    s_b = mu_b + 0.2 * rng.standard_normal(n)
    s_s = mu_s + 0.2 * rng.standard_normal(n)
    res = preference_shift(mu_b, mu_s, s_b, s_s, baseline_score=content, n_boot=200, n_perm=200)
    assert res["tracking"]["r"] > 0.9 and res["probe_shift"]["r"] > 0.9
    assert res["baseline"]["d_s"] == 0.0 and res["baseline"]["vs_mu_shift"]["r"] < res["probe_shift"]["r"]
    sub = preference_shift(mu_b, mu_s, s_b, s_s, idx=np.arange(10), n_boot=50, n_perm=50)
    assert sub["n"] == 10 and "baseline" not in sub
    frozen = preference_shift(mu_b, mu_s, s_b, s_b + 0.01 * rng.standard_normal(n), n_boot=200, n_perm=200)
    assert abs(frozen["tracking"]["r"]) < 0.3
    with pytest.raises(ShiftError, match="score_shift has 79 entries"):
        preference_shift(mu_b, mu_s, s_b, s_s[:-1])
    with pytest.raises(ShiftError, match="non-finite value at index 4"):
        preference_shift(mu_b, mu_s, s_b, np.where(np.arange(n) == 4, np.nan, s_s))


def test_pref_shift_stage(model, pool, personas, tiny_run):
    run, cfg, summary = tiny_run
    kw = dict(seed=cfg.seed, alphas=cfg.probes.alphas)
    out = run_pref_shift_stage(cfg.pref_shift, run, model, pool, personas, probe_summary=summary, **kw)
    json.dumps(out)
    assert out["base"] == "default" and out["hook"] == HOOKS[2] and list(out["shifts"]) == ["evil"]
    ev = out["shifts"]["evil"]
    assert set(ev) == {"heldout", "all_in_sample"}  # no unlabelled all-task number
    assert ev["all_in_sample"]["n"] == 14 and ev["heldout"]["n"] == 3 == out["n_heldout"]
    # this fixture's probe records no held-out tasks: the pipeline's test split, said so
    assert out["heldout_from"].startswith("default_splits") and len(out["heldout_tasks"]) == 3
    assert -1 <= ev["heldout"]["tracking"]["r"] <= 1 and "vs_mu_shift" in ev["heldout"]["baseline"]
    # without probe_summary the single saved probe folder is found
    out2 = run_pref_shift_stage(cfg.pref_shift, run, model, pool, personas, **kw)
    assert out2["shifts"]["evil"]["heldout"]["tracking"]["r"] == pytest.approx(ev["heldout"]["tracking"]["r"])
    with pytest.raises(ShiftError, match="not one of the run's personas"):
        run_pref_shift_stage(dataclasses.replace(cfg.pref_shift, base="nobody"), run, model, pool, personas, **kw)


def test_pref_shift_is_scored_on_the_probes_heldout_tasks(model, pool, personas, tiny_run, tmp_path):
    """The shift tracks the probe perfectly on the tasks the probe trained on and not at all (r = 0 by
    construction) on the ones it recorded as held out: the headline must be the held-out 0, not the
    in-sample all-task r."""
    import shutil
    from prefjax.experiments.pref_shift import heldout_tasks
    from prefjax.probes import RidgeProbe
    from prefjax.stages import RunLayout, atomic_save_npz
    run0, cfg, summary = tiny_run
    run = RunLayout(str(tmp_path / "run"))
    for name in personas:
        shutil.copytree(run0.activations_dir(name), run.activations_dir(name))
    ids = list(pool.ids)
    held = np.array([1, 4, 6, 9, 12])
    X = {}
    for name in personas:
        from prefjax.store import open_existing
        X[name] = open_existing(run.activations_dir(name)).read(hook=HOOKS[2])[:, 0, :].astype(np.float32)
    probe = RidgeProbe.load(run0.probe_dir("default", 2))
    probe.save(run.probe_dir("default", 2), hook=HOOKS[2], layer=2, position=0,
               heldout_tasks=[ids[i] for i in held])
    d_s = probe.predict(X["evil"]) - probe.predict(X["default"])
    mu_b = np.asarray(np.load(run0.utilities("default"))["mu"], np.float64)
    d_mu = d_s.astype(np.float64).copy()
    # on the held-out tasks: a utility change orthogonal to the score change (after centering)
    ds_h = d_s[held] - d_s[held].mean()
    v = np.random.default_rng(5).standard_normal(len(held))
    v -= v.mean()
    v -= (v @ ds_h) / (ds_h @ ds_h) * ds_h
    d_mu[held] = d_s[held].mean() + 0.3 * v * d_s.std() / v.std()
    atomic_save_npz(run.utilities("default"), mu=mu_b, sigma=np.ones_like(mu_b))
    atomic_save_npz(run.utilities("evil"), mu=mu_b + d_mu, sigma=np.ones_like(mu_b))
    idx, src = heldout_tasks(RidgeProbe.load(run.probe_dir("default", 2)), pool, 0)
    assert list(idx) == list(held) and src == "probe cfg.json heldout_tasks"
    out = run_pref_shift_stage(cfg.pref_shift, run, model, pool, personas, probe_summary=summary,
                               seed=cfg.seed, alphas=cfg.probes.alphas)
    ev = out["shifts"]["evil"]
    assert out["n_heldout"] == 5 and out["heldout_tasks"] == [ids[i] for i in held]
    assert ev["all_in_sample"]["tracking"]["r"] > 0.6  # in-sample: high
    assert abs(ev["heldout"]["tracking"]["r"]) < 1e-6 and ev["heldout"]["n"] == 5  # held-out: zero
    assert ev["heldout"]["tracking"]["p_value"] > 0.5
    lo, hi = ev["heldout"]["tracking"]["ci"]
    assert lo < 0 < hi
    # a probe recording tasks the pool lacks is refused
    probe.save(run.probe_dir("default", 2), hook=HOOKS[2], layer=2, position=0, heldout_tasks=["nope"])
    with pytest.raises(ShiftError, match="not in the task pool"):
        run_pref_shift_stage(cfg.pref_shift, run, model, pool, personas, probe_summary=summary,
                             seed=cfg.seed, alphas=cfg.probes.alphas)


# ---------------------------------------------------------------------------------------------
# True / false

def test_bundled_statements():
    st = load_statements()
    assert len(st) >= 60 and sum(s.label for s in st) * 2 == len(st)
    assert len({s.id for s in st}) == len(st) and len({s.topic for s in st}) >= 3


def test_statement_file_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a", "text": "x", "label": true}\n{"id": "b", "text": "y", "label": "yes"}\n')
    with pytest.raises(TrueFalseError, match=r"s.jsonl:2: field 'label'"):
        load_statements(p)
    p.write_text('{"id": "a", "text": "x", "label": true}\n{"id": "a", "text": "y", "label": false}\n')
    with pytest.raises(TrueFalseError, match="duplicate id 'a'"):
        load_statements(p)


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.random(50) < 0.4
    s = np.round(rng.standard_normal(50) + y, 1)  # rounding makes ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(np.arange(6.0), [0, 0, 0, 1, 1, 1]) == 1.0
    assert auc(np.ones(4), [0, 1, 0, 1]) == 0.5
    with pytest.raises(TrueFalseError, match="both classes"):
        auc([1.0, 2.0], [True, True])


def test_classifiers_match_sklearn():
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.preprocessing import StandardScaler
    from prefjax.experiments.truefalse import _logistic_scores, _ridge_scores
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 20))
    y = X[:, 0] + 0.3 * rng.standard_normal(120) > 0
    tr, te = np.arange(90), np.arange(90, 120)
    sc = StandardScaler().fit(X[tr])
    ref = RidgeClassifier(alpha=3.0).fit(sc.transform(X[tr]), y[tr]).decision_function(sc.transform(X[te]))
    np.testing.assert_allclose(_ridge_scores(X[tr], y[tr], X[te], 3.0), ref, atol=1e-8)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(sc.transform(X[tr]), y[tr])
    np.testing.assert_allclose(_logistic_scores(X[tr], y[tr], X[te], 2.0),
                               ref.decision_function(sc.transform(X[te])), atol=1e-3)
    folds = stratified_folds(y, 5)
    assert all(abs(y[folds == k].sum() - y.sum() / 5) <= 1 for k in range(5))
    good = cv_classifier_auc(X, y, kind="logistic", n_folds=5)
    assert good["auc"] > 0.85 and len(good["fold_auc"]) == 5
    noise = cv_classifier_auc(rng.standard_normal((120, 20)), y, kind="ridge", n_folds=5)
    assert abs(noise["auc"] - 0.5) < 0.2


def test_statement_activations_match_task_extraction(model, personas):
    st = load_statements()
    # the stage's exact call (same hooks, shapes): the compiled program is shared with test_truefalse_stage
    acts = statement_activations(model, st, [HOOKS[2]], persona=personas["evil"], n_after=0)
    assert acts.shape == (1, len(st), 1, model.d_model)
    from prefjax.elicit.prompts import task_messages
    for k in (2, len(st) - 1):  # first batch, and the last (partly filled) batch
        ids = model.tokenizer.encode_chat(task_messages(st[k].text, personas["evil"]))
        eot = model.tokenizer.end_of_turn_index(ids)
        _, cache = model.run(np.asarray([ids], np.int32), capture=[HOOKS[2]], positions=np.asarray([[eot]]))
        np.testing.assert_allclose(acts[0, k], np.asarray(cache[HOOKS[2]])[0], atol=1e-5)


def test_truefalse_stage(model, pool, personas, tiny_run):
    run, cfg, summary = tiny_run
    # "evil" has a probe; "assistant" has none and is skipped (one persona keeps the test fast)
    use = {"evil": personas["evil"], **{p.name: p for p in personas_from_spec(["assistant"])}}
    out = run_truefalse_stage(cfg.truefalse, run, model, pool, use, seed=cfg.seed)
    json.dumps(out)
    assert out["n_statements"] >= 60 and "skipped" in out["persona"]["assistant"]
    for name in ["evil"]:
        r = out["persona"][name]
        assert 0 <= r["probe_auc"]["auc"] <= 1 and r["probe_auc"]["ci"][0] <= r["probe_auc"]["auc"]
        assert 0 <= r["ridge_cv"]["auc"] <= 1 and len(r["logistic_cv"]["fold_auc"]) == 4
        assert r["hook"] == HOOKS[2] and len(r["probe_auc_per_topic"]) == 4
        z = np.load(os.path.join(run.stage_dir("truefalse"), f"{name}.npz"))
        assert z["score"].shape == (out["n_statements"],)
        assert auc(z["score"], z["label"]) == pytest.approx(r["probe_auc"]["auc"])
