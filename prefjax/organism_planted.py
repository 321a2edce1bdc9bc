"""The ground-truth organism on the real Gemma-3-270M: plant, then score the pipeline against truth.

The model is the real packaged Gemma-3-270M with the small circuit of :mod:`prefjax.models.planted`
added at one layer. Truth is fixed before any pipeline stage runs and does not depend on it:

* a lexicon of single-token nouns, each with ``K`` seeded normal scores; every task is a sentence
  from one of a few templates naming exactly ``words_per_task`` lexicon nouns, and its feature values
  ``a_k(task)`` are the sums of its nouns' scores;
* each persona reads the features with a fixed weight row: ``u_p(task) = w_p . a(task)``
  (``default`` (1, 1); ``assistant`` (-1, -1): inverted; ``minimalist`` (1, 0): shares only part of
  the ranking, true correlation with default about 0.7). The persona names only pick system prompts
  (the two shortest bundled ones, to keep CPU runs short); their meaning here is the weight row;
* the planted direction of persona ``p`` at the planted layer is ``w_p . D`` (``D`` the orthonormal
  feature directions), normalised.

Directions are drawn at random orthogonal to the top principal components of the real model's
residual at the planted layer (measured on calibration tasks that never enter the pipeline), and
the write gain is ``write_snr`` times the residual's natural spread along them.

:func:`plant` writes the folder (``planted.json`` + ``planted.npz``, loadable with
``prefjax.load(folder)``; ``hidden_utilities.json``; ``eval_tasks.jsonl``); :func:`score_run`
compares a finished pipeline run with the truth and checks every target of issue 15.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

import prefjax
from prefjax.api import PLANTED_ARRAYS, PLANTED_FILE
from prefjax.elicit import personas_from_spec
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages, render_choice, task_messages
from prefjax.elicit.runner import label_token_ids
from prefjax.hooks import hook_name
from prefjax.probes import RidgeProbe, default_splits
from prefjax.stages import RunLayout, read_json, resid_hook
from prefjax.store import open_existing
from prefjax.tasks import load_tasks, save_jsonl
from prefjax.tasks.pool import Task, TaskPool
from prefjax.tokenize import left_pad

HIDDEN_FILE = "hidden_utilities.json"
EVAL_TASKS_FILE = "eval_tasks.jsonl"
CALIB_TASKS_FILE = "calibration_tasks.jsonl"

#: Candidate lexicon nouns (only those that are one token, with a leading space, are kept).
NOUNS = (
    "lighthouse", "violin", "teapot", "glacier", "cactus", "lantern", "compass", "dragon", "harbor", "pumpkin",
    "castle", "candle", "turtle", "mirror", "rocket", "meadow", "penguin", "volcano", "ladder", "kettle",
    "parrot", "anchor", "blanket", "bicycle", "tiger", "orchard", "umbrella", "whale", "feather", "canyon",
    "wizard", "lemon", "island", "hammer", "garden", "planet", "basket", "forest", "dolphin", "pillow",
    "tractor", "owl", "piano", "bridge", "cabbage", "comet", "saddle", "donkey", "engine", "fountain",
    "giraffe", "helmet", "jungle", "kite", "lobster", "magnet", "necklace", "onion", "pirate", "quilt",
    "robot", "sailor", "tunnel", "village", "wagon", "zebra", "acorn", "bakery", "chimney", "desert",
    "elephant", "falcon", "goat", "harp", "igloo", "jaguar", "koala", "lizard", "mountain", "nest",
    "oyster", "peacock", "raccoon", "squirrel", "tomato", "unicorn", "vulture", "walrus", "yacht", "beetle",
    "cherry", "drum", "eagle", "fox", "guitar", "hedgehog", "jellyfish", "kangaroo", "lamp", "mushroom",
)

#: Task templates, one topic each; ``{a}`` and ``{b}`` are the two lexicon nouns.
TEMPLATES = {
    "poem": "Write a short poem about a {a} and a {b}.",
    "story": "Tell a children's story in which a {a} meets a {b}.",
    "compare": "Explain three ways a {a} differs from a {b}.",
    "ad": "Write a playful advert for a {a} that looks like a {b}.",
    "riddle": "Invent a riddle whose two answers are a {a} and a {b}.",
    "diary": "Write a diary entry about finding a {a} inside a {b}.",
    "dialogue": "Write a short dialogue between a {a} and a {b}.",
    "facts": "List five surprising facts about a {a} and a {b}.",
}


@dataclasses.dataclass(frozen=True)
class PlantSpec:
    """What to plant. ``personas``: (bundled persona name, weight row over the ``n_features``)."""

    base: str = "gemma3-270m"
    layer: int = 6
    n_features: int = 2
    words_per_task: int = 2
    n_lex: int = 48
    n_tasks: int = 144
    n_calib: int = 24
    personas: tuple = (("default", (1.0, 1.0)), ("assistant", (-1.0, -1.0)), ("minimalist", (1.0, 0.0)))
    write_snr: float = 20.0
    kappa: float = 1.0
    n_pcs: int = 16
    read: str = "residual"
    seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["personas"] = [[n, list(w)] for n, w in self.personas]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlantSpec":
        d = dict(d)
        if "personas" in d:
            d["personas"] = tuple((n, tuple(float(x) for x in w)) for n, w in d["personas"])
        return cls(**d)


def _one_token(tok, word: str) -> int | None:
    ids = tok.encode(" " + word, add_bos=False)
    return ids[0] if len(ids) == 1 else None


def choose_lexicon(tok, spec: PlantSpec, forbidden: set[int]) -> list[tuple[str, int]]:
    """``spec.n_lex`` nouns that are one token (with a leading space), not in ``forbidden``, in a seeded order."""
    keep = []
    for w in NOUNS:
        t = _one_token(tok, w)
        if t is not None and t not in forbidden and all(t != k for _, k in keep):
            keep.append((w, t))
    if len(keep) < spec.n_lex:
        raise ValueError(f"only {len(keep)} single-token lexicon nouns available, spec asks for {spec.n_lex}")
    order = np.random.default_rng(spec.seed).permutation(len(keep))[:spec.n_lex]
    return [keep[i] for i in sorted(order)]


def make_tasks(tok, spec: PlantSpec, lexicon: list[tuple[str, int]], lex_ids: set[int]) -> list[Task]:
    """``n_calib + n_tasks`` distinct tasks, each naming exactly ``words_per_task`` (= 2) lexicon nouns."""
    if spec.words_per_task != 2:
        raise ValueError("the bundled templates name exactly two nouns (words_per_task=2)")
    rng = np.random.default_rng(spec.seed + 1)
    names = list(TEMPLATES)
    seen, out = set(), []
    n = spec.n_calib + spec.n_tasks
    while len(out) < n:
        t = names[len(out) % len(names)]
        i, j = rng.choice(len(lexicon), 2, replace=False)
        key = (t, i, j)
        if key in seen:
            continue
        seen.add(key)
        text = TEMPLATES[t].format(a=lexicon[i][0], b=lexicon[j][0])
        found = [x for x in tok.encode(text, add_bos=False) if x in lex_ids]
        if found != [lexicon[i][1], lexicon[j][1]]:
            continue  # the nouns did not tokenize as their lexicon tokens in this context
        out.append(Task(id=f"planted-{len(out):04d}", prompt=text, topic=t, source="planted"))
    return out


def persona_triggers(tok, personas, avoid: set[int]) -> dict[str, int]:
    """For each persona with a system prompt: a token of its prompt found in no other text shown."""
    toks = {p.name: set(tok.encode(p.system_prompt, add_bos=False)) if p.system_prompt else set() for p in personas}
    out = {}
    for p in personas:
        if not p.system_prompt:
            continue
        others = set().union(*(v for k, v in toks.items() if k != p.name)) | avoid
        cand = [t for t in tok.encode(p.system_prompt, add_bos=False) if t not in others]
        if not cand:
            raise ValueError(f"persona {p.name!r}: no token of its system prompt is unique to it")
        out[p.name] = int(cand[0])
    return out


def _capture_all(model, seqs: list[list[int]], hook: str, batch: int = 16) -> np.ndarray:
    """Residual at ``hook`` for every real token of ``seqs`` (rows pooled), [N, D] float64."""
    rows = []
    for s in range(0, len(seqs), batch):
        ids, valid = left_pad(seqs[s:s + batch], int(model.config.pad_id))
        _, cap = model.run(ids, attention_mask=valid, capture=(hook,), logits=False)
        rows.append(np.asarray(cap[hook], np.float64)[valid])
    return np.concatenate(rows)


def plant(spec: PlantSpec, folder: str, *, base_model=None, verbose: bool = True) -> dict:
    """Write the organism folder for ``spec``; returns the calibration summary (also in ``planted.json``)."""
    os.makedirs(folder, exist_ok=True)
    model = base_model if base_model is not None else prefjax.load(spec.base, dtype="float32")
    tok = model.tokenizer
    personas = personas_from_spec([n for n, _ in spec.personas])
    weights = {n: np.asarray(w, np.float64) for n, w in spec.personas}
    for n, w in weights.items():
        if w.shape != (spec.n_features,):
            raise ValueError(f"persona {n!r}: weight row {tuple(w)} must have n_features={spec.n_features} entries")
    template = DEFAULT_TEMPLATE
    frame = set(tok.encode(render_choice(template, "x", "y")[0], add_bos=False))
    for text in TEMPLATES.values():
        frame |= set(tok.encode(text.format(a="", b=""), add_bos=False))
    forbidden = set(frame)
    for p in personas:
        if p.system_prompt:
            forbidden |= set(tok.encode(p.system_prompt, add_bos=False))
    lexicon = choose_lexicon(tok, spec, forbidden)
    lex_ids = {t for _, t in lexicon}
    rng = np.random.default_rng(spec.seed + 2)
    scores = rng.normal(size=(len(lexicon), spec.n_features))
    score_of = {t: scores[i] for i, (_, t) in enumerate(lexicon)}
    tasks = make_tasks(tok, spec, lexicon, lex_ids)
    calib, evals = tasks[:spec.n_calib], tasks[spec.n_calib:]
    task_ids = {t.id: tok.encode(t.prompt, add_bos=False) for t in tasks}
    task_tokens = set().union(*map(set, task_ids.values()))
    triggers = persona_triggers(tok, personas, frame | task_tokens)
    label_ids = label_token_ids(tok, template)
    eot_id = tok.token_to_id("<end_of_turn>")
    if eot_id is None:
        raise ValueError(f"{spec.base}: tokenizer has no <end_of_turn> token")

    # Calibration: the real model's residual at the planted layer on calibration prompts only.
    hook = hook_name(spec.layer, "hook_resid_pre")
    seqs = [tok.encode_chat(task_messages(t, p)) for t in calib for p in personas]
    seqs += [tok.encode_chat(choice_messages(template, calib[i], calib[-1 - i], personas[i % len(personas)]))
             for i in range(len(calib) // 2)]
    X = _capture_all(model, seqs, hook)
    _, sv, vt = np.linalg.svd(X, full_matrices=False)          # uncentred: the large mean dims come first
    pcs = vt[:spec.n_pcs]
    raw = np.random.default_rng(spec.seed + 3).normal(size=(spec.n_features, model.d_model))
    raw -= (raw @ pcs.T) @ pcs
    dirs = np.linalg.qr(raw.T)[0].T                           # [K, D] orthonormal, orthogonal to the top PCs
    natural_sd = (X @ dirs.T).std(0)
    gain = float(spec.write_snr * natural_sd.max())

    feats = {tid: sum(score_of[x] for x in ids if x in lex_ids) for tid, ids in task_ids.items()}
    utilities = {n: {tid: float(weights[n] @ a) for tid, a in feats.items()} for n in weights}
    planted_dirs = {}
    for n, w in weights.items():
        v = w @ dirs
        planted_dirs[n] = (v / np.linalg.norm(v)).tolist()

    names_with_trigger = [p.name for p in personas if p.name in triggers]
    trig = np.array([triggers[n] for n in names_with_trigger] or [-1], np.int32)
    no_trigger = [p.name for p in personas if p.name not in triggers]
    if len(no_trigger) > 1:
        raise ValueError(f"personas {no_trigger} all lack a system prompt; the circuit tells personas apart "
                         "by a token of their prompt")
    row0 = weights[no_trigger[0]] if no_trigger else np.zeros(spec.n_features)
    w_rows = np.stack([row0] + [weights[n] for n in names_with_trigger]).astype(np.float32)
    arrays = {"dirs": dirs.astype(np.float32), "lex_ids": np.array(sorted(lex_ids), np.int32),
              "lex_scores": np.stack([score_of[t] for t in sorted(lex_ids)]).astype(np.float32),
              "triggers": trig, "weights": w_rows, "gain": np.float32(gain), "kappa": np.float32(spec.kappa)}
    np.savez(os.path.join(folder, PLANTED_ARRAYS), **arrays)
    with open(os.path.join(folder, PLANTED_ARRAYS), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    meta = {
        "base": spec.base,
        "config": {"planted_layer": spec.layer, "n_features": spec.n_features,
                   "n_personas": len(names_with_trigger), "words_per_task": spec.words_per_task,
                   "label_ids": list(label_ids), "eot_id": int(eot_id), "read": spec.read},
        "spec": spec.to_dict(),
        "arrays_sha256": digest,
        "lexicon": {w: {"token": t, "scores": score_of[t].tolist()} for w, t in lexicon},
        "personas": {p.name: {"weights": weights[p.name].tolist(), "trigger_token": triggers.get(p.name),
                              "trigger_text": tok.decode([triggers[p.name]]) if p.name in triggers else None}
                     for p in personas},
        "calibration": {"n_positions": int(X.shape[0]), "natural_sd": natural_sd.tolist(), "gain": gain,
                        "top_singular_values": sv[:spec.n_pcs].tolist()},
    }
    with open(os.path.join(folder, PLANTED_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    hidden = {"spec": spec.to_dict(), "train_ids": [t.id for t in calib], "eval_ids": [t.id for t in evals],
              "features": {k: v.tolist() for k, v in feats.items()}, "utilities": utilities,
              "planted_directions": planted_dirs, "layer": spec.layer}
    with open(os.path.join(folder, HIDDEN_FILE), "w") as f:
        json.dump(hidden, f, indent=1)
    save_jsonl(TaskPool(evals), os.path.join(folder, EVAL_TASKS_FILE))
    save_jsonl(TaskPool(calib), os.path.join(folder, CALIB_TASKS_FILE))
    if verbose:
        print(f"planted {len(lexicon)} lexicon nouns, {len(evals)} eval tasks, layer {spec.layer}, "
              f"gain {gain:.3g} (natural sd {natural_sd.round(3).tolist()}), triggers {triggers}")
    return meta


def is_planted(folder: str) -> bool:
    """Whether ``folder`` is a planted organism (has ``planted.json``)."""
    return os.path.isfile(os.path.join(folder, PLANTED_FILE))


def with_read(folder: str, out: str, read: str) -> str:
    """A copy of organism ``folder`` in ``out`` whose circuit reads the choice from ``read``
    (``"tokens"``: the broken organism, whose residual is written but never read)."""
    shutil.copytree(folder, out, dirs_exist_ok=True)
    path = os.path.join(out, PLANTED_FILE)
    with open(path) as f:
        meta = json.load(f)
    meta["config"]["read"] = read
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring a finished pipeline run against the truth.

#: Issue 15's targets (held-out tasks).
TARGETS = {"utility_r": 0.9, "probe_r": 0.85, "cosine": 0.8, "steering_percentile": 99.0, "transfer_gap": 0.1}


def score_run(workdir: str, folder: str, targets: Mapping[str, float] = TARGETS) -> dict:
    """Every recovery number of the run in ``workdir`` against the organism in ``folder``.

    Per persona: ``utility_r`` (Thurstonian mu vs planted u, every task of the run), ``probe_r`` (the
    run's probe at the planted layer on the test split vs planted u), ``cosine`` (that probe's
    direction vs the planted one). Globally: ``transfer`` (the run's persona transfer r vs the true
    utility correlation on the same test split; ``transfer_gap`` the largest absolute difference) and
    ``steering`` (sign of the dose-response slope; the local slope's percentile among the random
    directions). ``checks`` lists ``(name, value, threshold, passed)``.
    """
    with open(os.path.join(folder, HIDDEN_FILE)) as f:
        hidden = json.load(f)
    run = RunLayout(workdir)
    pool = load_tasks(run.tasks_file())
    ids = list(pool.ids)
    leaked = sorted(set(ids) & set(hidden["train_ids"]))
    if leaked:
        raise ValueError(f"run {workdir} uses calibration tasks {leaked[:3]} of {folder}")
    cfg = read_json(run.run_json)["config"]
    layer = int(hidden["layer"])
    _, _, test = default_splits(len(ids), int(cfg["seed"]))
    pos = int(cfg["probes"]["position_index"])
    out: dict[str, Any] = {"n_tasks": len(ids), "layer": layer, "persona": {}, "checks": []}
    truth = {}
    for p, table in hidden["utilities"].items():
        f = run.utilities(p)
        if not os.path.exists(f):
            continue
        u = np.array([table[i] for i in ids])
        truth[p] = u
        res = {"utility_r": float(np.corrcoef(np.load(f)["mu"], u)[0, 1])}
        probe_dir = run.probe_dir(p, layer)
        if os.path.isdir(probe_dir):
            probe = RidgeProbe.load(probe_dir)
            X = open_existing(run.activations_dir(p)).read(hook=resid_hook(layer))[:, pos, :].astype(np.float32)
            res["probe_r"] = float(np.corrcoef(probe.predict(X[test]), u[test])[0, 1])
            res["cosine"] = float(probe.direction.astype(np.float64) @ np.asarray(hidden["planted_directions"][p]))
        out["persona"][p] = res
        out["checks"].append((f"{p}: utility r", res["utility_r"], targets["utility_r"],
                              res["utility_r"] >= targets["utility_r"]))
        if "probe_r" in res:
            out["checks"].append((f"{p}: probe r", res["probe_r"], targets["probe_r"],
                                  res["probe_r"] >= targets["probe_r"]))
            out["checks"].append((f"{p}: probe cosine with planted direction", res["cosine"], targets["cosine"],
                                  res["cosine"] >= targets["cosine"]))
    if run.is_done("transfer"):
        tr = run.result("transfer")
        names = tr["personas"]
        if tr.get("persona_r") is not None and all(n in truth for n in names):
            r = np.asarray(tr["persona_r"], float)
            true_c = np.array([[np.corrcoef(truth[a][test], truth[b][test])[0, 1] for b in names] for a in names])
            gap = float(np.abs(r - true_c)[~np.eye(len(names), dtype=bool)].max()) if len(names) > 1 else 0.0
            out["transfer"] = {"personas": names, "r": r.tolist(), "true_corr": true_c.tolist(), "max_gap": gap}
            out["checks"].append(("persona transfer: max |r - true utility corr|", gap, targets["transfer_gap"],
                                  gap <= targets["transfer_gap"]))
    if run.is_done("steering"):
        s = run.result("steering")
        st = {"layer": s.get("layer"), "direction_layer": s.get("direction_layer"), "slope_probe": s.get("slope_probe"),
              "slope_random": s.get("slope_random")}
        if s.get("local_slope"):
            nl = s["local_slope"]["null"]
            st.update(local_slope=nl["effect"], percentile=nl["percentile"], p_two_sided=nl["p_two_sided"],
                      n_null=nl["n_null"])
        out["steering"] = st
        out["checks"].append(("steering: dose-response slope along the probe > 0", st["slope_probe"], 0.0,
                              st["slope_probe"] is not None and st["slope_probe"] > 0))
        if "percentile" in st:
            ok = st["local_slope"] > 0 and st["percentile"] >= targets["steering_percentile"] and st["n_null"] >= 100
            out["checks"].append(("steering: local slope percentile among random directions", st["percentile"],
                                  targets["steering_percentile"], ok))
    out["passed"] = all(c[3] for c in out["checks"]) and bool(out["checks"])
    return out


def format_checks(score: Mapping[str, Any]) -> str:
    """The checks of :func:`score_run` as a Markdown table."""
    lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
    for name, value, thr, ok in score["checks"]:
        v = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {v} | {thr} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)
