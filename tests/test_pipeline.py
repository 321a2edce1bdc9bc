"""The tiny pipeline end to end (in-process, cheap config), and its refusals of bad input."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(**edits):
    """``configs/default.py:tiny`` made cheaper (16 tasks, degree 4, 3 steering pairs, 1 INLP step)."""
    from configs.default import get_config
    c = get_config("tiny")
    c.tasks.n = 16
    c.choices.degree = 4
    c.steering.n_pairs = 3
    c.inlp.n_iter = 1
    c.probes.n_perm = 5
    # steer at a middle layer: the tiny random model's best probe layer can be the last, where steering
    # cannot reach the answer position (no effect, a degenerate null and no power statement)
    c.steering.layer = "1"
    c.personas = ("default", "evil")
    c.progress = False
    for k, v in edits.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    c.lock()
    return c


@pytest.fixture(scope="module")
def tiny_model():
    import prefjax
    return prefjax.load("gemma3-tiny-tok", dtype="float32")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    from prefjax.pipeline import run_pipeline
    wd = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config()
    report = run_pipeline(cfg, str(wd), model=tiny_model)
    with open(wd / "summary.json") as f:
        summary = json.load(f)
    return wd, report, summary


def test_outputs_exist(finished):
    wd, report, summary = finished
    assert report == os.path.join(str(wd), "report.md")
    text = open(report).read()
    assert len(text) > 200 and "Probes" in text and "Steering" in text
    figs = sorted(os.listdir(wd / "figures"))
    assert figs == sorted(["utilities_by_topic.png", "probe_r_default.png", "probe_r_evil.png", "transfer_persona.png",
                           "transfer_layer.png", "steering.png", "steering_sampled.png", "inlp.png"])
    for f in figs:
        data = (wd / "figures" / f).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), f
        assert f in text, f"report.md does not show {f}"
    for stage in ("tasks", "choices-default", "choices-evil", "utilities", "activations-default",
                  "activations-evil", "probes", "transfer", "steering", "inlp"):
        assert (wd / "stages" / f"{stage}.done").exists(), stage


def test_summary_contents(finished):
    wd, _, s = finished
    assert set(s["utilities"]) == {"default", "evil"}
    for p in ("default", "evil"):
        u = s["utilities"][p]
        assert u["converged"] and u["n_pairs"] > 0 and u["counts"]["ok"] == 2 * u["n_pairs"]
        dg = u["diagnostics"]  # what the utilities are (prefjax.utility.diagnostics), from the stored rows
        assert dg["position_bias"]["n_parsed"] == u["counts"]["ok"] and dg["heldout"]["n_pairs"] == u["n_pairs"]
        assert dg["order_averaged"]["n_pairs"] == u["n_pairs"] and isinstance(dg["warnings"], list)
        mu = np.load(wd / "stages" / "utilities" / f"{p}.npz")["mu"]
        assert mu.shape == (16,) and np.isfinite(mu).all() and mu.std() > 0
    layers = s["probes"]["layers"]
    assert layers == [0, 1, 2, 3]  # gemma3-tiny-tok has 4 layers, "all" captured
    for p in ("default", "evil"):
        per = s["probes"]["persona"][p]["per_layer"]
        assert [d["layer"] for d in per] == layers
        assert all(d["heldout_r"] is None or -1 <= d["heldout_r"] <= 1 for d in per)
        assert s["probes"]["persona"][p]["best_layer"] in layers
        # headline r per layer from nested CV: interval, per-fold alphas, a shuffle null through the same procedure
        alphas = list(tiny_config().probes.alphas)
        for d in per:
            nst = d["nested"]
            assert -1 <= nst["r"] <= 1 and nst["ci"][0] <= nst["ci"][1]
            assert len(nst["fold_alpha"]) == tiny_config().probes.cv_outer and set(nst["fold_alpha"]) <= set(alphas)
            assert nst["n_perm"] == tiny_config().probes.n_perm and 0 < nst["p_value"] <= 1
            assert d["alpha"] in alphas and d["heldout_ci"][0] <= d["heldout_ci"][1] and 0 < d["heldout_p"] <= 1
            assert d["loto_ci"][0] <= d["loto_ci"][1]
            # the saved probe is fitted at the alpha the nested CV chose on the tasks outside the test split
            cfg = json.loads((wd / "probes" / p / f"blocks.{d['layer']}.hook_resid_post" / "cfg.json").read_text())
            assert cfg["alpha"] == d["alpha"] and "inner" in cfg["alpha_from"]
        best = max(per, key=lambda d: d["nested"]["r"])
        assert s["probes"]["persona"][p]["best_layer"] == best["layer"]
        sn = s["probes"]["persona"][p]["shuffle_null"]
        assert sn["p_value"] == best["nested"]["p_value"] and sn["observed_r"] == best["nested"]["r"]
        assert s["probes"]["persona"][p]["content_baseline"]["nested"]["ci"] is not None
        # the headline r: layer chosen inside the CV (prefjax.probes.layersel), its null rerunning the selection
        ls = s["probes"]["persona"][p]["layer_selected"]
        assert -1 <= ls["r"] <= 1 and ls["ci"][0] <= ls["ci"][1] and set(ls["fold_layer"]) <= set(layers)
        assert ls["null"]["n_perm"] == tiny_config().probes.layer_select_n_perm and 0 < ls["null"]["p_value"] <= 1
        assert ls["decompositions"] == 0 and ls["best_layer"]["layer"] == best["layer"]
        assert ls["per_layer_r"] == pytest.approx([d["nested"]["r"] for d in per], abs=1e-12)
        assert any(t["test"] == f"probe r, layer chosen inside CV [{p}]" and t["p_holm"] >= t["p"]
                   for t in s["multiplicity"]["tests"])
    t = s["transfer"]
    assert t["personas"] == ["default", "evil"]
    assert np.asarray(t["persona_r"]).shape == (2, 2) and np.asarray(t["utility_corr"]).shape == (2, 2)
    assert np.asarray(t["layer_r"]).shape == (4, 4)
    # cross-layer cells carry bootstrap intervals over the test tasks (None where undefined), said to be rough
    lr = np.asarray(t["layer_r"], float)
    lo, hi = (np.array([[np.nan if v is None else v for v in row] for row in t[k]], float)
              for k in ("layer_r_lo", "layer_r_hi"))
    assert lo.shape == hi.shape == (4, 4) and np.isfinite(lo).any()
    ok = np.isfinite(lo) & np.isfinite(hi)
    assert np.all(lo[ok] <= lr[ok] + 1e-12) and np.all(lr[ok] <= hi[ok] + 1e-12)
    assert t["layer_n_test"] == s["probes"]["n_test"] and len(t["layer_alpha"]) == 4
    assert "Cross-layer transfer" in (wd / "report.md").read_text()
    assert "**Small held-out split:**" in (wd / "report.md").read_text()  # 16 tasks: 3 test tasks
    # leave-one-topic-out: an alpha per held-out topic, chosen by inner CV on the other topics
    for p in ("default", "evil"):
        for d in s["probes"]["persona"][p]["per_layer"]:
            assert d["loto_alpha"] and set(d["loto_alpha"].values()) <= set(tiny_config().probes.alphas)
    nt = t["persona_nested"]  # nested-CV alpha, bootstrap intervals, shuffle nulls, the whole alpha grid
    r, lo, hi = (np.asarray(nt[k]) for k in ("r", "ci_lo", "ci_hi"))
    assert r.shape == (2, 2) and np.all(lo <= r + 1e-12) and np.all(r <= hi + 1e-12)
    assert np.asarray(nt["r_grid"]).shape == (len(tiny_config().probes.alphas), 2, 2)
    assert np.all((np.asarray(nt["p_value_two_sided"]) > 0) & (np.asarray(nt["p_value_two_sided"]) <= 1))
    assert "Cross-persona transfer" in (wd / "report.md").read_text()
    m = np.load(wd / "stages" / "transfer" / "matrices.npz")
    assert m["persona_r"].shape == (2, 2) and m["layer_r"].shape == (4, 4) and m["layer_r_lo"].shape == (4, 4)
    st = s["steering"]
    coefs = list(tiny_config().steering.coefs)
    assert st["coefs"] == coefs and st["n_pairs"] == 3
    for name in ("probe", "random"):
        assert [r["coef"] for r in st[name]] == coefs
        assert all(0 <= r["p_steered_mean"] <= 1 and r["n"] == 6 for r in st[name])  # each pair, both ways
    sm = st["sampled"]  # the sampled-completion arm: every coef, both directions, rates in [0, 1]
    assert sm["n_prompts"] == 6 and [r["coef"] for r in sm["probe"]] == coefs
    for name in ("probe", "random"):
        for r in sm[name]:
            assert 0 <= r["refusal_rate"] <= 1 and 0 <= r["unparseable_rate"] <= 1 and r["n"] <= 6
    texts = json.loads((wd / "stages" / "steering" / "completions.json").read_text())["texts"]
    assert texts["probe_+0"] == texts["random_+0"]  # c = 0: the same greedy completions
    zero = coefs.index(0.0)
    # c = 0 is unsteered whatever the direction: bit-identical P and counts.
    assert st["probe"][zero]["p_steered_mean"] == st["random"][zero]["p_steered_mean"]
    assert st["probe"][zero]["k"] == st["random"][zero]["k"]
    assert len(s["inlp"]["test_r"]) >= 1
    # the direction comes from the probe fit at the steering layer (every layer's probe is saved)
    assert st["direction_layer"] == st["layer"]
    for layer in layers:
        assert (wd / "probes" / "default" / f"blocks.{layer}.hook_resid_post").is_dir()
    # slopes from the linear range, tested over pairs, with the smallest detectable slope
    dose, pw = st["dose_slopes"], st["power"]
    assert dose["linear_coefs"] == [c for c in coefs if abs(c) <= tiny_config().steering.linear_max]
    assert st["slope_probe"] == dose["slope"]["probe"] == pytest.approx(dose["per_pair"]["probe"]["mean"])
    assert pw["n_pairs"] == 3 and pw["mde_slope_probe_vs_zero"] > 0 and pw["mde_slope_probe_vs_random"] > 0
    assert 0 < pw["local_abs_slope_p05"] < pw["local_abs_slope_p01"] and 0 < pw["local_abs_cosine_p05"] < 1
    assert all(r["linear"] == (abs(r["coef"]) <= tiny_config().steering.linear_max) for r in st["probe"])
    text = (wd / "report.md").read_text()
    top = text[:text.index("## Headline")]
    assert "What is and is not distinguishable from the nulls" in top
    assert "the dose-response test could detect a probe slope of" in top and "permutation p" in top
    assert "layer chosen inside the cross-validation" in top and "## Tests and family-wise correction" in text
    assert "from random directions" in top
    ls = st["local_slope"]  # the random-direction null of the local slope
    assert ls["null"]["n_null"] == tiny_config().steering.n_null >= 100
    assert 0 <= ls["null"]["percentile"] <= 100 and 0 < ls["null"]["p_two_sided"] <= 1
    assert ls["slopes"]["probe"] == ls["null"]["effect"] and abs(ls["probe_cosine_with_gradient"]) <= 1
    # the null of unit directions is centred on 0 with sd |g| / sqrt(d)
    d = 64
    assert abs(ls["null"]["null_sd"] - ls["gradient_norm"] / np.sqrt(d)) < 0.15 * ls["gradient_norm"] / np.sqrt(d)


def test_steering_zero_coef_equals_unsteered_forward(finished, tiny_model):
    """P(A) at c=0 equals a plain forward pass on the same prompts (recomputed here independently)."""
    from prefjax.elicit import personas_from_spec
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages
    from prefjax.elicit.runner import forced_text, label_token_ids
    from prefjax.pipeline import load_task_pool
    from prefjax.runconfig import RunConfig
    wd, _, s = finished
    cfg = tiny_config()
    pool = load_task_pool(RunConfig.from_config(cfg).tasks)
    persona = personas_from_spec([s["steering"]["persona"]])[0]
    idx = np.random.default_rng(cfg.seed).permutation(len(pool))
    tok = tiny_model.tokenizer
    ida, idb = label_token_ids(tok, DEFAULT_TEMPLATE)
    p = []
    for k in range(3):
        a, b = pool[int(idx[2 * k])], pool[int(idx[2 * k + 1])]
        text = tok.chat(choice_messages(DEFAULT_TEMPLATE, a, b, persona), add_generation_prompt=True)
        ids = np.asarray([tok.encode(text + forced_text(DEFAULT_TEMPLATE), add_bos=False)], np.int32)
        logits, _ = tiny_model.run(ids, positions=np.asarray([[ids.shape[1] - 1]], np.int32))
        lg = np.asarray(logits[0, 0], np.float64)
        p.append(np.exp(lg[ida] - np.logaddexp(lg[ida], lg[idb])))
    zero = s["steering"]["coefs"].index(0.0)
    saved = np.load(wd / "stages" / "steering" / "p_a.npz")
    assert saved["toward_a"].tolist() == [True, False] * 3  # each pair steered towards A, then towards B
    for name in ("probe", "random"):  # the same prompt twice per pair; P(A) unsteered at c = 0
        np.testing.assert_allclose(saved[name][zero], np.repeat(p, 2), rtol=0, atol=1e-5)
    # balanced design: the label-position bias cancels, P(steered) at c = 0 is exactly one half
    np.testing.assert_allclose(s["steering"]["probe"][zero]["p_steered_mean"], 0.5, atol=1e-12)


def test_unknown_persona_fails_before_compute(tmp_path):
    from prefjax.elicit.personas import PersonaError
    from prefjax.pipeline import run_pipeline

    class NoModel:  # any use of the model would fail loudly
        tokenizer = property(lambda self: pytest.fail("the model was touched"))

    with pytest.raises(PersonaError, match="nosuchpersona"):
        run_pipeline(tiny_config(personas=("default", "nosuchpersona")), str(tmp_path / "wd"), model=NoModel())
    assert not (tmp_path / "wd").exists()


def test_bad_stage_list_fails_before_compute(tmp_path):
    from prefjax.pipeline import run_pipeline
    with pytest.raises(ValueError, match="prerequisite.*activations"):
        run_pipeline(tiny_config(stages=("tasks", "choices", "utilities", "probes")), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="unknown stage.*probe'"):
        run_pipeline(tiny_config(stages=("tasks", "probe")), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_mode_fields_fail_before_compute(tmp_path):
    from prefjax.pipeline import run_pipeline
    with pytest.raises(ValueError, match="steering.mode.*'contrastiv'"):
        run_pipeline(tiny_config(**{"steering.mode": "contrastiv"}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="choices.mode.*'logits'"):
        run_pipeline(tiny_config(**{"choices.mode": "logits"}), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_duplicate_task_ids_fail_before_compute(tmp_path):
    from prefjax.pipeline import run_pipeline
    f = tmp_path / "tasks.jsonl"
    lines = [{"id": f"t{i}", "prompt": f"Task number {i}.", "topic": "misc"} for i in range(6)]
    lines.append({"id": "t3", "prompt": "Another task with a repeated id.", "topic": "misc"})
    f.write_text("".join(json.dumps(d) + "\n" for d in lines))
    with pytest.raises(ValueError, match=r"duplicate id 't3'.*lines 4 and 7"):
        run_pipeline(tiny_config(**{"tasks.source": str(f)}), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def _digest_tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def test_workdir_of_a_different_config_is_refused(finished, tiny_model):
    from prefjax.pipeline import run_pipeline
    from prefjax.stages import StageConfigError
    wd, _, _ = finished
    before = _digest_tree(wd)
    with pytest.raises(StageConfigError, match=r"tasks\.seed: 0 -> 1"):
        run_pipeline(tiny_config(**{"tasks.seed": 1}), str(wd), model=tiny_model)
    assert _digest_tree(wd) == before  # nothing written, nothing touched


def test_config_typo_on_command_line_is_an_absl_error(tmp_path):
    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), "--config",
                        os.path.join(ROOT, "configs", "default.py") + ":tiny", "--config.tasks.nn=3",
                        "--workdir", str(wd)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert "FATAL Flags parsing error" in r.stderr and "section 'tasks' has no key 'nn'" in r.stderr, r.stderr[-2000:]
    assert not wd.exists()


# ---------------------------------------------------------------------------------------------
# Experiment configs: every config x every model argument.

EXPERIMENTS = ("utilities", "extract", "probes", "transfer", "steering", "inlp", "patching", "pref_shift", "truefalse")
MODEL_ARGS = ("", "tiny", "gemma3-270m", "gemma3-27b", "qwen35-122b-a10b", "llama31-8b")


def _load_config(name, arg):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.lock()
    return c


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_lock_and_validate(name):
    from prefjax.runconfig import STAGES, RunConfig, check_stages
    for arg in MODEL_ARGS:
        c = _load_config(name, arg)
        with pytest.raises(AttributeError):
            c.tasks.nn = 3  # a typo is an error, not a new field
        with pytest.raises(AttributeError):
            c.choises = {}
        assert tuple(c.stages) == check_stages(c.stages) and set(c.stages) <= set(STAGES)
        assert c.stages[0] == "tasks"
        mesh = RunConfig.from_config(c).mesh
        assert mesh.auto or mesh.data * mesh.fsdp * mesh.tensor * mesh.expert >= 1  # auto: from the devices
        if arg == "llama31-8b":
            c.adapters_dir = "/mnt/loras"
            spec = RunConfig.from_config(c).persona_spec()
            assert spec[0] == "default" and all(s.startswith("adapter:/mnt/loras/") for s in spec[1:]), spec
            c.checkpoints_dir = "/mnt/ckpt"
            assert c.model.source == "/mnt/ckpt/Llama-3.1-8B-Instruct"  # follows the field
    with pytest.raises(ValueError, match="unknown model 'gemma3-27B'"):
        _load_config(name, "gemma3-27B")
    stages = {n: tuple(_load_config(n, "tiny").stages) for n in EXPERIMENTS}
    assert "choices" not in stages["extract"] and "activations" not in stages["utilities"]
    assert "steering" in stages["steering"] and "inlp" not in stages["steering"]


@pytest.mark.parametrize("arg", ("gemma3-27b", "qwen35-122b-a10b", "llama31-8b"))
def test_big_model_rows_fit_their_mesh_and_layers(arg):
    """Shape-level checks only (no weights here): layers to capture exist, the mesh can shard the model."""
    import jax
    from prefjax.models import family_for_preset
    from prefjax.runconfig import resolve_layers
    c = _load_config("probes", arg)
    fam = family_for_preset(c.model.preset)
    cfg = fam.presets[c.model.preset]
    shapes = jax.eval_shape(lambda k: fam.init_params(cfg, k, dtype=c.model.dtype), jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    layers = resolve_layers(c.activations.layers, cfg.n_layers)
    assert layers[-1] == cfg.n_layers - 1 and len(layers) >= 8
    from prefjax.preflight import resolve_mesh_shape
    from prefjax.runconfig import RunConfig
    shape = resolve_mesh_shape(RunConfig.from_config(c), 8, model_cfg=cfg)  # the mesh derived on an 8-GPU host
    n_dev = int(np.prod(list(shape.values()))) if shape else 1
    per_device_gib = n_params * 2 / n_dev / 2**30  # bfloat16
    expected = {"gemma3-27b": 27e9, "qwen35-122b-a10b": 122e9, "llama31-8b": 8e9}[arg]
    assert 0.8 * expected < n_params < 1.3 * expected, n_params
    assert per_device_gib < 70, f"{arg}: {per_device_gib:.0f} GiB of weights per device on mesh {c.mesh}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_tiny_runs_first_two_stages(name, tmp_path, tiny_model):
    from prefjax.pipeline import run_pipeline
    c = _load_config(name, "tiny")
    c.unlock()
    first2 = tuple(c.stages[:2])
    c.stages = first2
    c.tasks.n = 8
    c.choices.degree = 2
    c.progress = False
    c.lock()
    assert run_pipeline(c, str(tmp_path), model=tiny_model) is None  # no report stage
    done = sorted(p[:-5] for p in os.listdir(tmp_path / "stages") if p.endswith(".done"))
    want = ["tasks"] + [f"{first2[1]}-{p}" for p in c.personas]
    assert done == sorted(want)
    if first2[1] == "activations":  # extract: all layers x (end-of-turn + 4 after)
        from prefjax.store import open_existing
        st = open_existing(str(tmp_path / "activations" / "default"))
        assert st.read().shape == (8, 4, 5, 64)


def test_steering_direction_from_a_layer_without_a_probe_is_refused(finished, tiny_model):
    """A direction layer with no probe is an error naming the layer and where probes exist, before compute."""
    import dataclasses

    from prefjax.experiments.steering import run_steering_stage
    from prefjax.runconfig import RunConfig
    from prefjax.stages import RunLayout
    wd, _, s = finished
    sc = dataclasses.replace(RunConfig.from_config(tiny_config()).steering, direction_layer="99")
    layers = s["probes"]["layers"]
    with pytest.raises(ValueError, match=re.escape(f"no probe at layer 99 for persona 'default' (probes exist at "
                                                   f"layers {layers}")):
        run_steering_stage(sc, RunLayout(str(wd)), tiny_model, [], {"default": None}, probe_summary=s["probes"],
                           mean_norms={}, seed=0)
    with pytest.raises(ValueError, match="steering.n_null is 10"):
        run_steering_stage(dataclasses.replace(sc, n_null=10), RunLayout(str(wd)), tiny_model, [], {"default": None},
                           probe_summary=s["probes"], mean_norms={}, seed=0)
