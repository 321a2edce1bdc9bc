"""A model organism with planted preferences: ground truth for the whole pipeline.

A small Gemma-3-architecture decoder (real 262k Gemma vocabulary and tokenizer) is trained on
synthetic revealed choices whose outcome follows *hidden* per-task utilities that depend only on
task content, under several personas (system prompts) whose utilities differ by a known transform
(e.g. ``evil = -default``). The saved folder is an ordinary HF-style checkpoint, so
``prefjax.load(folder)`` and the unchanged pipeline can be run on it, and :func:`evaluate_recovery`
compares what the pipeline measured with what was planted.

Hidden utility of task ``t`` under persona ``p``::

    u_p(t) = scale_p * (topic_value[topic(t)] + content_weight * z(t)) + topic_shift_p[topic(t)]

``z(t)`` is a content feature computed from the task's tokens alone (standardised over the pool):

* ``"embed_projection"``: the mean frozen input embedding of the prompt's tokens projected on a
  fixed random unit vector (a linear function of the pipeline's content-embedding baseline);
* ``"length"``: log of the prompt's token count (not linear in the mean embedding).

Training target: at the last position of the pipeline's exact logit-mode prompt (chat-templated
choice prompt + ``"Task"``), the two-way softmax of the " A"/" B" logits is fitted by
cross-entropy to the Bradley-Terry probability ``sigmoid((u_a - u_b) / tau)``, both orders, all
personas. Only tasks of the training split are ever shown; the evaluation split (written as
``eval_tasks.jsonl``) tests that the planted utilities generalise through content.

The input embedding is frozen (it is also the tied unembedding): either the real Gemma-3-270M
embedding projected to ``d_model`` with a random orthonormal map (so related words stay close),
or random. Everything else (blocks, final norm) is trained with optax Adam in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import prefjax
from prefjax.checkpoints.gguf import default_gguf_path
from prefjax.elicit import personas_from_spec
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages
from prefjax.elicit.runner import forced_text, label_token_ids
from prefjax.hooks import CaptureSpec
from prefjax.models import gemma3
from prefjax.probes import RidgeProbe, default_splits, evaluate_probe, fit_ridge
from prefjax.stages import RunLayout, read_json, resid_hook
from prefjax.store import open_existing
from prefjax.tasks import load_default_pool, load_tasks, save_jsonl
from prefjax.tasks.pool import TaskPool
from prefjax.tokenize import Tokenizer, left_pad

#: Default topic values of the ``default`` persona (centred below): helpful, well-defined work high,
#: harmful or manipulative work low.
DEFAULT_TOPIC_VALUES: dict[str, float] = {
    "coding": 1.5, "math": 1.3, "knowledge_qa": 1.1, "fiction": 0.9, "content_generation": 0.6,
    "summarisation": 0.3, "persuasive_writing": 0.0, "sensitive_creative": -0.5, "security_legal": -0.9,
    "model_manipulation": -1.4, "harmful_request": -2.0,
}

HIDDEN_FILE = "hidden_utilities.json"
EVAL_TASKS_FILE = "eval_tasks.jsonl"
TRAIN_TASKS_FILE = "train_tasks.jsonl"
TRAINING_DIR = ".training"          # orbax checkpoints while training (removed when planted)


@dataclasses.dataclass(frozen=True)
class PersonaTransform:
    """How a persona's hidden utilities derive from the base ones: ``scale * base + topic_shift[topic]``.

    ``name`` must be a persona the pipeline can resolve (a bundled name such as ``"default"`` or
    ``"evil"``); its system prompt is what the organism is trained under.
    """

    name: str
    scale: float = 1.0
    topic_shift: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class OrganismSpec:
    """Everything that determines a planted organism (deterministic given ``seed``)."""

    topic_values: tuple[tuple[str, float], ...] = tuple(DEFAULT_TOPIC_VALUES.items())
    content_feature: str = "embed_projection"  # or "length"
    content_weight: float = 0.6
    personas: tuple[PersonaTransform, ...] = (PersonaTransform("default", 1.0), PersonaTransform("evil", -1.0))
    tau: float = 1.0
    train_frac: float = 0.6
    n_tasks: int = 0                     # 0: the whole default pool (345 tasks); else a stratified subset
    # architecture
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 256
    embed_init: str = "gemma3-270m"      # or "random"
    # training
    steps: int = 1500
    warm_first_persona: float = 0.3     # fraction of steps trained on the first persona only (curriculum)
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    bucket: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.content_feature not in ("embed_projection", "length"):
            raise ValueError(f"OrganismSpec.content_feature must be 'embed_projection' or 'length', "
                             f"got {self.content_feature!r}")
        if self.embed_init not in ("gemma3-270m", "random"):
            raise ValueError(f"OrganismSpec.embed_init must be 'gemma3-270m' or 'random', got {self.embed_init!r}")
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"OrganismSpec.train_frac must be in (0, 1), got {self.train_frac}")
        if self.tau <= 0:
            raise ValueError(f"OrganismSpec.tau must be > 0, got {self.tau}")
        names = [p.name for p in self.personas]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"OrganismSpec.personas must be non-empty with unique names, got {names}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["topic_values"] = dict(self.topic_values)
        d["personas"] = [{"name": p.name, "scale": p.scale, "topic_shift": dict(p.topic_shift)}
                         for p in self.personas]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OrganismSpec":
        """Inverse of :meth:`to_dict` (also accepts a config mapping); unknown keys are an error."""
        d = dict(d)
        allowed = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - allowed
        if extra:
            raise ValueError(f"unknown OrganismSpec fields {sorted(extra)}; allowed: {sorted(allowed)}")
        if "topic_values" in d:
            d["topic_values"] = tuple((str(k), float(v)) for k, v in dict(d["topic_values"]).items())
        if "personas" in d:
            ps = []
            for p in d["personas"]:
                if isinstance(p, PersonaTransform):
                    ps.append(p)
                    continue
                p = dict(p)
                bad = set(p) - {"name", "scale", "topic_shift"}
                if bad:
                    raise ValueError(f"unknown persona-transform fields {sorted(bad)} in {p}")
                ps.append(PersonaTransform(str(p["name"]), float(p.get("scale", 1.0)),
                                           tuple((str(k), float(v)) for k, v in dict(p.get("topic_shift", {})).items())))
            d["personas"] = tuple(ps)
        if "personas" in d and not isinstance(d["personas"], tuple):
            d["personas"] = tuple(d["personas"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Model shape, embedding, hidden utilities.

def organism_config(spec: OrganismSpec) -> gemma3.Gemma3Config:
    """A Gemma-3 config with the real vocabulary and full (global) attention on every layer."""
    return gemma3.Gemma3Config(
        vocab_size=262_144, d_model=spec.d_model, n_layers=spec.n_layers, n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, d_ff=spec.d_ff,
        layer_types=("full_attention",) * spec.n_layers, sliding_window=512,
        query_pre_attn_scalar=float(spec.head_dim), max_position_embeddings=2048, name="prefjax-organism")


def organism_embedding(spec: OrganismSpec, base_model=None) -> np.ndarray:
    """The frozen [262144, d_model] embedding: the real 270M embedding through a random orthonormal map
    (rows rescaled to mean norm 1), or random normal rows of mean norm 1."""
    rng = np.random.default_rng(spec.seed + 17)
    if spec.embed_init == "random":
        e = rng.standard_normal((262_144, spec.d_model), dtype=np.float32)
    else:
        if base_model is None:
            base_model = prefjax.load("gemma3-270m", dtype="float32")
        e270 = np.asarray(base_model.params["embed"], np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((e270.shape[1], spec.d_model)))
        e = e270 @ q.astype(np.float32)
    e /= np.linalg.norm(e, axis=1).mean()
    return e.astype(np.float32)


def content_feature(spec: OrganismSpec, embed_VxD: np.ndarray, tokenizer, pool) -> np.ndarray:
    """``z`` [n]: the standardised content feature of each task (see the module docstring)."""
    ids = [np.asarray(tokenizer.encode(t.prompt, add_bos=False)) for t in pool]
    if spec.content_feature == "length":
        z = np.log(np.array([len(i) for i in ids], np.float64))
    else:
        v = np.random.default_rng(spec.seed + 29).standard_normal(embed_VxD.shape[1])
        v /= np.linalg.norm(v)
        z = np.array([embed_VxD[i].mean(0) @ v for i in ids], np.float64)
    sd = z.std()
    return (z - z.mean()) / (sd if sd > 0 else 1.0)


def hidden_utilities(spec: OrganismSpec, pool, z_N: np.ndarray) -> dict[str, np.ndarray]:
    """``{persona: u [n]}`` for the tasks of ``pool`` (rows aligned with ``z_N``)."""
    tv = dict(spec.topic_values)
    missing = sorted({t.topic for t in pool} - set(tv))
    if missing:
        raise ValueError(f"OrganismSpec.topic_values has no value for topic(s) {missing}")
    mean_tv = float(np.mean(list(tv.values())))
    base = np.array([tv[t.topic] - mean_tv for t in pool]) + spec.content_weight * np.asarray(z_N)
    out = {}
    for p in spec.personas:
        shift = dict(p.topic_shift)
        bad = sorted(set(shift) - set(tv))
        if bad:
            raise ValueError(f"persona {p.name!r}: topic_shift names unknown topic(s) {bad}")
        out[p.name] = p.scale * base + np.array([shift.get(t.topic, 0.0) for t in pool])
    return out


def split_tasks(pool, train_frac: float, seed: int):
    """Stratified-by-topic split of the pool into (train, eval) TaskPools (each keeps pool order)."""
    rng = np.random.default_rng(seed + 5)
    train_ids = set()
    for topic, sub in pool.by_topic().items():
        ids = list(sub.ids)
        k = int(round(train_frac * len(ids)))
        train_ids.update(ids[i] for i in rng.permutation(len(ids))[:k])
    return (TaskPool([t for t in pool if t.id in train_ids]), TaskPool([t for t in pool if t.id not in train_ids]))


# ---------------------------------------------------------------------------------------------
# Training data: the pipeline's exact logit-mode prompt.

def choice_prompt_ids(tokenizer, task_a, task_b, persona) -> list[int]:
    """Token ids of the logit-mode prompt exactly as :func:`prefjax.elicit.runner._logit_rows` builds it."""
    text = tokenizer.chat(choice_messages(DEFAULT_TEMPLATE, task_a, task_b, persona), add_generation_prompt=True)
    return tokenizer.encode(text + forced_text(DEFAULT_TEMPLATE), add_bos=False)


def make_examples(spec: OrganismSpec, tokenizer, pool, util: Mapping[str, np.ndarray], n: int, seed: int,
                  only_first: bool = False):
    """``n`` random (pair, order, persona) examples from ``pool``: token lists and soft targets P(A)
    (``only_first``: every example under the first persona)."""
    personas = personas_from_spec([p.name for p in spec.personas])
    rng = np.random.default_rng(seed)
    seqs, targets, diffs = [], [], []
    for _ in range(n):
        a, b = rng.choice(len(pool), 2, replace=False)
        p = personas[0 if only_first else int(rng.integers(len(personas)))]
        d = (util[p.name][a] - util[p.name][b]) / spec.tau
        seqs.append(choice_prompt_ids(tokenizer, pool[int(a)], pool[int(b)], p))
        targets.append(1.0 / (1.0 + math.exp(-d)))
        diffs.append(d)
    return seqs, np.asarray(targets, np.float32), np.asarray(diffs, np.float32)


def _batches(seqs, targets, batch_size: int, bucket: int, pad_id: int, rng):
    """Left-padded batches grouped by length bucket (few distinct shapes -> few compilations)."""
    by_len: dict[int, list[int]] = {}
    for k, s in enumerate(seqs):
        by_len.setdefault(int(math.ceil(len(s) / bucket) * bucket), []).append(k)
    out = []
    for t, idx in by_len.items():
        idx = [idx[i] for i in rng.permutation(len(idx))]
        for s in range(0, len(idx) - batch_size + 1, batch_size):
            rows = idx[s:s + batch_size]
            ids, valid = left_pad([seqs[k] for k in rows], pad_id, width=t)
            out.append((ids, valid, targets[rows]))
    return [out[i] for i in rng.permutation(len(out))]


def _ab_logits(cfg, trainable, embed, ids_BxT, valid_BxT, ab_ids):
    params = {"embed": embed, **trainable}
    t = ids_BxT.shape[1]
    pos = jnp.full((ids_BxT.shape[0], 1), t - 1, jnp.int32)
    _, _, h, _ = gemma3.forward(cfg, params, ids_BxT, valid_BxT, capture=CaptureSpec.from_names((), cfg.n_layers),
                                pos_BxK=pos, logits=False, unroll=True)
    return jnp.einsum("bd,vd->bv", h[:, 0], embed[ab_ids])  # [B, 2]: " A", " B"


class TrainingCheckpoints:
    """Orbax checkpoints of the organism's training state under one folder: the trainable parameters
    and the optimizer state (``state``), and the loop's position (``meta``: step, losses, the batch
    sampler's RNG state and place, the spec). Orbax writes each step to a temporary folder and renames
    it when complete, so a kill at any moment leaves the previous step as the latest."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``, and wait for it."""
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step``; ``like`` is a pytree of the state's structure, shapes and dtypes."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                                     meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        """Release the manager (its background threads)."""
        self.manager.close()


def train_organism(spec: OrganismSpec, embed_VxD: np.ndarray, tokenizer, train_pool, util_train, *,
                   eval_pool=None, util_eval=None, log_every: int = 50, verbose: bool = True,
                   checkpoint_dir: str | None = None, checkpoint_every: int = 100):
    """Train the blocks and final norm (embedding frozen). Returns ``(params, info)``.

    ``info`` holds the loss curve, wall time, and (given ``eval_pool``) the Pearson r between the
    model's logit difference and the planted ``(u_a - u_b) / tau`` on held-out pairs of held-out tasks.

    With ``checkpoint_dir`` the training state is saved there with orbax every ``checkpoint_every``
    steps (:class:`TrainingCheckpoints`), and a call that finds a checkpoint resumes from it: a run
    killed mid-training and called again ends with the same parameters and loss curve as an
    uninterrupted one (``info["resumed_from"]`` gives the step it resumed at). A checkpoint of a
    different spec is refused.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    cfg = organism_config(spec)
    ab = jnp.asarray(label_token_ids(tokenizer, DEFAULT_TEMPLATE), jnp.int32)
    full = gemma3.init_params(cfg, jax.random.PRNGKey(spec.seed))
    trainable = {k: v for k, v in full.items() if k != "embed"}
    embed = jnp.asarray(embed_VxD)
    t0 = time.time()
    n1 = int(spec.warm_first_persona * spec.steps)
    phases = []
    for ph, (n_steps, only_first) in enumerate(((n1, True), (spec.steps - n1, False))):
        if n_steps > 0:
            s_, t_, _ = make_examples(spec, tokenizer, train_pool, util_train, n_steps * spec.batch_size + 1024,
                                      spec.seed + 1 + 10 * ph, only_first=only_first)
            phases.append((n_steps, s_, t_))
    targets = np.concatenate([p[2] for p in phases])
    rng = np.random.default_rng(spec.seed + 2)
    pad = tokenizer.pad_id or 0
    t_data = time.time() - t0
    sched = optax.warmup_cosine_decay_schedule(0.0, spec.lr, spec.warmup, max(spec.steps, spec.warmup + 1),
                                               end_value=spec.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    opt_state = opt.init(trainable)

    def loss_fn(tp, emb, ids, valid, tgt):
        lg = _ab_logits(cfg, tp, emb, ids, valid, ab)
        logp = jax.nn.log_softmax(lg, axis=-1)
        return -jnp.mean(tgt * logp[:, 0] + (1 - tgt) * logp[:, 1])

    @jax.jit
    def step(tp, os_, emb, ids, valid, tgt):
        loss, g = jax.value_and_grad(loss_fn)(tp, emb, ids, valid, tgt)
        upd, os_ = opt.update(g, os_, tp)
        return optax.apply_updates(tp, upd), os_, loss

    losses, k, batches = [], 0, []
    t1 = time.time()
    phase_end, ph = 0, -1
    gen_state, popped, resumed_from = None, 0, None  # the sampler's RNG state before the current batches
    ckpt = TrainingCheckpoints(checkpoint_dir) if checkpoint_dir else None
    try:
        if ckpt is not None and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(ckpt.latest_step(), {"params": trainable, "opt": opt_state})
            if meta["spec"] != json.loads(json.dumps(spec.to_dict())):
                raise ValueError(f"{checkpoint_dir} holds training checkpoints of a different OrganismSpec; "
                                 f"delete it or use another folder")
            trainable, opt_state = state["params"], state["opt"]
            k, losses, ph, phase_end = int(meta["step"]), list(meta["losses"]), int(meta["phase"]), \
                int(meta["phase_end"])
            gen_state, popped, resumed_from = meta["gen_state"], int(meta["popped"]), k
            if gen_state is not None:  # the same batches, the same ones already used
                rng.bit_generator.state = gen_state
                batches = _batches(phases[ph][1], phases[ph][2], spec.batch_size, spec.bucket, pad, rng)
                del batches[len(batches) - popped:]
            if verbose:
                print(f"[organism] resuming at step {k}/{spec.steps} from {checkpoint_dir}", flush=True)
        while k < spec.steps:
            if k >= phase_end:
                ph += 1
                phase_end += phases[ph][0]
                batches = []
            if not batches:
                gen_state, popped = rng.bit_generator.state, 0
                batches = _batches(phases[ph][1], phases[ph][2], spec.batch_size, spec.bucket, pad, rng)
            ids, valid, tgt = batches.pop()
            popped += 1
            trainable, opt_state, loss = step(trainable, opt_state, embed, ids, valid, tgt)
            losses.append(float(loss))
            k += 1
            if verbose and (k % log_every == 0 or k == spec.steps):
                print(f"[organism] step {k}/{spec.steps} loss {np.mean(losses[-log_every:]):.4f} "
                      f"({time.time() - t1:.0f}s)", flush=True)
            if ckpt is not None and (k % checkpoint_every == 0 or k == spec.steps):
                ckpt.save(k, {"params": trainable, "opt": opt_state},
                          {"step": k, "losses": losses, "phase": ph, "phase_end": phase_end,
                           "gen_state": gen_state, "popped": popped, "spec": spec.to_dict()})
    finally:
        if ckpt is not None:
            ckpt.close()
    # The entropy floor of the soft targets, so the loss can be read as a KL.
    info = {"losses": losses, "train_seconds": time.time() - t1, "data_seconds": t_data, "resumed_from": resumed_from,
            "target_entropy": float(-np.mean(targets * np.log(targets + 1e-12)
                                             + (1 - targets) * np.log(1 - targets + 1e-12)))}
    params = {"embed": embed, **trainable}
    if eval_pool is not None:
        info["eval"] = pair_fit(spec, cfg, params, tokenizer, eval_pool, util_eval, n=256, seed=spec.seed + 3)
        info["train_fit"] = pair_fit(spec, cfg, params, tokenizer, train_pool, util_train, n=256, seed=spec.seed + 4)
    return params, info


def pair_fit(spec, cfg, params, tokenizer, pool, util, *, n: int = 256, seed: int = 0) -> dict:
    """Pearson r (and sign agreement) of the model's " A" - " B" logit gap with the planted gap, on random pairs."""
    ab = jnp.asarray(label_token_ids(tokenizer, DEFAULT_TEMPLATE), jnp.int32)
    seqs, _, diffs = make_examples(spec, tokenizer, pool, util, n, seed)
    fn = jax.jit(lambda tp, e, i, v: _ab_logits(cfg, tp, e, i, v, ab))
    tp = {k: v for k, v in params.items() if k != "embed"}
    gaps = []
    for s in range(0, n, 32):
        ids, valid = left_pad(seqs[s:s + 32], 0, multiple=64)
        lg = np.asarray(fn(tp, params["embed"], ids, valid))
        gaps.append(lg[:, 0] - lg[:, 1])
    g = np.concatenate(gaps)
    return {"r": float(np.corrcoef(g, diffs)[0, 1]), "sign_agree": float(np.mean(np.sign(g) == np.sign(diffs))),
            "n": n}


# ---------------------------------------------------------------------------------------------
# Saving as an HF-style folder (the inverse of gemma3.hf_names' transforms).

def save_checkpoint(folder: str, cfg: gemma3.Gemma3Config, params, tokenizer) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``folder``."""
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(dict(gemma3.params_to_hf(cfg, params)), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**gemma3.hf_config(cfg), "torch_dtype": "float32"}, f, indent=1)
    tokenizer.save(folder)


# ---------------------------------------------------------------------------------------------
# The whole planting.

def plant_organism(spec: OrganismSpec, folder: str, *, base_model=None, verbose: bool = True) -> dict:
    """Plant an organism into ``folder`` (checkpoint + tokenizer + ``hidden_utilities.json`` +
    ``train_tasks.jsonl`` / ``eval_tasks.jsonl``). Returns the training info (also in the JSON).
    Killed mid-training, the same call resumes from the orbax checkpoints in ``<folder>/.training``."""
    t0 = time.time()
    pool = load_default_pool()
    if spec.n_tasks and spec.n_tasks < len(pool):
        pool = pool.subset(spec.n_tasks, seed=spec.seed, stratified=True)
    if base_model is None and spec.embed_init == "gemma3-270m":
        base_model = prefjax.load("gemma3-270m", dtype="float32")
    if base_model is not None:
        tok = base_model.tokenizer
    else:
        tok = Tokenizer.from_gguf(default_gguf_path())
    embed = organism_embedding(spec, base_model)
    z = content_feature(spec, embed, tok, pool)
    util = hidden_utilities(spec, pool, z)
    train, ev = split_tasks(pool, spec.train_frac, spec.seed)
    idx = {tid: i for i, tid in enumerate(pool.ids)}
    sel = lambda sub: {p: u[[idx[i] for i in sub.ids]] for p, u in util.items()}
    t_setup = time.time() - t0
    # Training resumes from <folder>/.training after a kill; the folder goes once the model is saved.
    ckpt_dir = os.path.join(folder, TRAINING_DIR)
    params, info = train_organism(spec, embed, tok, train, sel(train), eval_pool=ev, util_eval=sel(ev),
                                  verbose=verbose, checkpoint_dir=ckpt_dir)
    cfg = organism_config(spec)
    save_checkpoint(folder, cfg, params, tok)
    save_jsonl(train, os.path.join(folder, TRAIN_TASKS_FILE))
    save_jsonl(ev, os.path.join(folder, EVAL_TASKS_FILE))
    info["setup_seconds"] = t_setup
    summary = {k: v for k, v in info.items() if k != "losses"}
    summary["loss_first50"] = float(np.mean(info["losses"][:50]))
    summary["loss_last50"] = float(np.mean(info["losses"][-50:]))
    hidden = {"spec": spec.to_dict(), "train_ids": list(train.ids), "eval_ids": list(ev.ids),
              "content_z": {tid: float(z[i]) for i, tid in enumerate(pool.ids)},
              "utilities": {p: {tid: float(u[i]) for i, tid in enumerate(pool.ids)} for p, u in util.items()},
              "training": summary}
    with open(os.path.join(folder, HIDDEN_FILE), "w") as f:
        json.dump(hidden, f, indent=1)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return info


def load_hidden(folder: str) -> dict:
    """The ``hidden_utilities.json`` of an organism folder."""
    path = os.path.join(folder, HIDDEN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {HIDDEN_FILE} (not an organism folder?)")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Recovery: what the pipeline measured vs what was planted.

def evaluate_recovery(workdir: str, organism_dir: str) -> dict:
    """Compare a finished pipeline run in ``workdir`` with the planted truth of ``organism_dir``.

    Returns per persona: ``utility_r`` (Thurstonian mu vs hidden u, all tasks), ``probe_r_hidden``
    (the pipeline's saved best-layer probe applied to the test split, vs hidden u), the pipeline's
    own ``probe_heldout_r`` (vs mu), and ``probe_r_hidden_by_layer`` (a ridge probe per layer fitted on
    the train/eval splits *against hidden u*, test split r: where the truth is linearly readable);
    and globally ``transfer`` (the pipeline's persona transfer matrix) and ``steering`` slopes.
    """
    hidden = load_hidden(organism_dir)
    run = RunLayout(workdir)
    pool = load_tasks(run.tasks_file())
    ids = list(pool.ids)
    missing = [i for i in ids if i not in hidden["utilities"][next(iter(hidden["utilities"]))]]
    if missing:
        raise ValueError(f"tasks {missing[:5]} of the run are not in {organism_dir}/{HIDDEN_FILE}")
    leaked = sorted(set(ids) & set(hidden["train_ids"]))
    run_cfg = read_json(run.run_json)["config"]
    seed = int(run_cfg["seed"])
    n = len(ids)
    train_i, ev_i, test_i = default_splits(n, seed)
    out: dict[str, Any] = {"n_tasks": n, "train_tasks_in_run": len(leaked), "persona": {}}
    probes_res = run.result("probes") if run.is_done("probes") else None
    for pname, table in hidden["utilities"].items():
        f = run.utilities(pname)
        if not os.path.exists(f):
            continue
        u = np.array([table[i] for i in ids])
        mu = np.load(f)["mu"]
        res = {"utility_r": float(np.corrcoef(mu, u)[0, 1])}
        acts = run.activations_dir(pname)
        if probes_res is not None and pname in probes_res["persona"] and os.path.isdir(acts):
            ps = probes_res["persona"][pname]
            layer = ps["best_layer"]
            hook = resid_hook(layer)
            pos = int(run_cfg["probes"]["position_index"])
            st = open_existing(acts)
            probe = RidgeProbe.load(run.probe_dir(pname, layer))
            X = st.read(hook=hook)[:, pos, :].astype(np.float32)
            res["best_layer"] = layer
            res["probe_r_hidden"] = float(np.corrcoef(probe.predict(X[test_i]), u[test_i])[0, 1])
            res["probe_heldout_r"] = next(d["heldout_r"] for d in ps["per_layer"] if d["layer"] == layer)
            res["content_baseline_r"] = ps["content_baseline"]["heldout_r"]
            by_layer = {}
            for h in st.hooks if hasattr(st, "hooks") else [hook]:
                Xl = st.read(hook=h)[:, pos, :].astype(np.float32)
                pr = fit_ridge(Xl, u, alphas=tuple(run_cfg["probes"]["alphas"]),
                               eval_idx=ev_i, train_idx=train_i)
                by_layer[h] = evaluate_probe(pr, Xl, u, test_i)["r"]
            res["probe_r_hidden_by_layer"] = by_layer
        out["persona"][pname] = res
    if run.is_done("transfer"):
        tr = run.result("transfer")
        out["transfer"] = {"personas": tr["personas"], "persona_r": tr["persona_r"], "utility_corr": tr["utility_corr"]}
    if run.is_done("steering"):
        s = run.result("steering")
        out["steering"] = {k: s[k] for k in ("persona", "layer", "slope_probe", "slope_random", "coefs")}
        out["steering"]["p_probe"] = [r["p_steered_mean"] for r in s["probe"]]
        out["steering"]["p_random"] = [r["p_steered_mean"] for r in s["random"]]
        if s.get("local_slope"):
            nl = s["local_slope"]["null"]
            out["steering"]["direction_layer"] = s.get("direction_layer")
            out["steering"]["local_slope"] = {"probe": nl["effect"], "percentile": nl["percentile"],
                                              "p_two_sided": nl["p_two_sided"], "n_null": nl["n_null"],
                                              "cosine": s["local_slope"]["probe_cosine_with_gradient"]}
    return out
