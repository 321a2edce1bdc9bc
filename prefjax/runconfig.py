"""The run config, typed: one frozen dataclass per config section, built once from the ConfigDict.

``configs/common.py`` is the one source of defaults: it declares every key the code reads (so every
key can be set on the command line, ``--config.section.key=value``). The dataclasses here declare the
same keys with their types and no defaults; :meth:`RunConfig.from_config` refuses a section with an
undeclared key or a missing key, naming the section. Each stage then receives its own section::

    cfg = RunConfig.from_config(config_dict)     # launch/main.py's locked ConfigDict, or a mapping
    cfg.steering.n_pairs, cfg.probes.alphas      # typed, validated

This module also holds what reading the config needs and nothing else imports: the stage list and
its prerequisites (:func:`check_stages`), the layer spec (:func:`resolve_layers`) and the persona
spec (:func:`persona_spec`). It imports nothing from prefjax (the bottom of the module graph).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

STAGES = ("tasks", "choices", "utilities", "activations", "probes", "transfer", "steering", "inlp", "patching",
          "pref_shift", "truefalse", "report")
# What each stage reads: a config's ``stages`` must list a stage's prerequisites too.
STAGE_DEPS = {"tasks": (), "choices": ("tasks",), "utilities": ("choices",), "activations": ("tasks",),
              "probes": ("utilities", "activations"), "transfer": ("probes",), "steering": ("probes",),
              "inlp": ("probes",), "patching": ("tasks",), "pref_shift": ("probes",), "truefalse": ("probes",),
              "report": ("utilities",)}


class RunConfigError(ValueError):
    """A config section has an undeclared, missing or ill-typed key, or a value out of range."""


def check_stages(stages) -> tuple[str, ...]:
    """Validate a config's ``stages`` (known names, prerequisites present); returns them in run order."""
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config field 'stages' names unknown stage(s) {unknown}; known: {list(STAGES)}")
    missing = sorted({f"{d} (needed by {s})" for s in stages for d in STAGE_DEPS[s] if d not in stages})
    if missing:
        raise ValueError(f"config field 'stages' lacks prerequisite stage(s): {', '.join(missing)}")
    return tuple(s for s in STAGES if s in stages)


def resolve_layers(spec, n_layers: int) -> list[int]:
    """Layer indices of a layers spec: ``"all"``, ``"every<k>"`` (plus the last layer), ``"3,7,11"`` or
    a sequence of ints; a layer outside ``0..n_layers-1`` is an error."""
    if spec in (None, "all"):
        return list(range(n_layers))
    if isinstance(spec, str):
        if spec.startswith("every"):
            k = int(spec[5:])
            return list(range(0, n_layers, k)) + ([n_layers - 1] if (n_layers - 1) % k else [])
        spec = [int(x) for x in spec.split(",")]
    layers = [int(l) for l in spec]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"activations.layers names layer(s) {bad}; the model has layers 0..{n_layers - 1}")
    return layers


# ---------------------------------------------------------------------------------------------
# The sections. No defaults here: configs/common.py declares every key with its default.

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``model``: the table row (``name``, ``preset``), the checkpoint ``source`` and the ``dtype``;
    ``split_layers`` ("auto", "on", "off"): block weights one buffer per layer after loading
    (:func:`prefjax.model.apply_layer_split`; "auto" splits on a GPU, one device, a dense family)."""
    name: str
    preset: str
    dtype: str
    source: str
    split_layers: str


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``mesh``: device-mesh axis sizes ``data``, ``fsdp``, ``tensor``, ``expert``.

    * every axis 0 (the big model rows' default): **auto**, the mesh is derived from this process's
      devices (:func:`prefjax.sharding.auto_mesh_shape`: one device, no mesh; several, all on ``fsdp``
      for a dense model, ``fsdp`` x ``expert`` for a mixture of experts);
    * any axis set: a **named** mesh, unset (0) axes read as 1. A product of 1 means a single device;
      a larger product must equal the device count (refused before the run's workdir is created:
      :func:`prefjax.preflight.resolve_mesh_shape`)."""
    data: int
    fsdp: int
    tensor: int
    expert: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise RunConfigError(f"config field 'mesh.{f.name}' is {getattr(self, f.name)}; expected a size "
                                     ">= 1, or 0 on every axis to derive the mesh from the devices")

    @property
    def auto(self) -> bool:
        """True when every axis is 0: derive the mesh from the devices present."""
        return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """``tasks``: ``source`` ("default" = the bundled pool, or a JSONL/CSV file; "" = unset, an error
    when the run starts: configs/paper.py leaves it for the user), ``n`` (0 = all; more than the pool
    holds is an error), ``seed`` (of the stratified subset)."""
    source: str
    n: int
    seed: int

    def __post_init__(self):
        if self.n < 0:
            raise RunConfigError(f"config field 'tasks.n' is {self.n}; expected 0 (every task) or a count >= 1")


@dataclasses.dataclass(frozen=True)
class ChoicesConfig:
    """``choices``: pairwise elicitation (``mode`` logit|sample) and active learning.

    ``template``: "" for the default choice template, or a JSON file of ChoiceTemplate fields.
    ``engine``: sample mode runs through the continuous-batching engine where the model allows it
    (``batch_size`` cache rows); False: batched ``generate``."""
    mode: str
    samples: int
    orders: str
    degree: int
    active_rounds: int
    pairs_per_round: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    template: str
    engine: bool


@dataclasses.dataclass(frozen=True)
class ActivationsConfig:
    """``activations``: ``layers`` spec, turn-boundary tokens after end-of-turn (``n_after``), batch, dtype."""
    layers: str
    n_after: int
    batch_size: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class ProbesConfig:
    """``probes``: ridge ``alphas``, the stored position read (``position_index``), shuffle-null ``n_perm``,
    and the folds of the nested cross-validation that chooses alpha and estimates held-out r
    (``cv_outer`` outer folds estimate, ``cv_inner`` inner folds inside each outer training set choose).
    ``standardize``: z-score each activation dimension before the ridge fit (the probe's direction, used
    for steering, is then reweighted by 1/variance per dimension; False fits on raw activations).
    ``alpha_rule``: ``"best"`` (largest inner-CV r) or ``"1se"`` (largest alpha within one standard error
    of it: a less noisy direction where the r curve is flat). ``layer_select_n_perm``: permutations of the
    null of the layer chosen inside the cross-validation (the headline probe r; every permutation reruns
    the selection over layers and alphas, :mod:`prefjax.probes.layersel`)."""
    alphas: tuple[float, ...]
    position_index: int
    n_perm: int
    cv_outer: int
    cv_inner: int
    standardize: bool
    alpha_rule: str
    layer_select_n_perm: int


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """``steering``: persona ("" = first), ``layer`` ("best" or an index), ``mode`` contrastive|single,
    ``coefs`` (fractions of the mean residual norm), ``n_pairs``, ``generate_tokens`` (0 = logit only),
    ``direction_layer`` (the layer whose probe gives the direction: "" = the steering layer; any other
    value is an explicit, logged mismatch), ``n_null`` (random directions of the local-slope null),
    ``linear_max`` (dose-response slopes use only coefficients with |c| <= this; larger ones are shown
    as saturating, not fitted), ``min_on_label`` (slopes use only coefficients where both the probe's and
    the random direction's on-label rate, the top next token being a label, is at least this; others are
    shown as off format, not fitted), ``engine`` (the greedy completions run through the continuous-batching
    engine where the model allows it; False: ``generate``)."""
    persona: str
    layer: str
    mode: str
    coefs: tuple[float, ...]
    n_pairs: int
    generate_tokens: int
    direction_layer: str
    n_null: int
    linear_max: float
    min_on_label: float
    engine: bool


@dataclasses.dataclass(frozen=True)
class InlpConfig:
    """``inlp``: iterations of nullspace projection (0 skips the stage)."""
    n_iter: int


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
    """``patching``: end-of-turn activation patching. ``layers`` "" = ``activations.layers``;
    ``persona`` "" = first persona; ``source_persona`` "" = second persona (if any)."""
    n_pairs: int
    layers: str
    sources: tuple[str, ...]
    modes: tuple[str, ...]
    min_effect: float
    batch_size: int
    persona: str
    source_persona: str


@dataclasses.dataclass(frozen=True)
class PrefShiftConfig:
    """``pref_shift``: ``base`` persona ("" = first), ``shifts`` (() = every other persona), bootstrap
    and permutation counts."""
    n_boot: int
    n_perm: int
    base: str
    shifts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TrueFalseConfig:
    """``truefalse``: CV folds, ridge/logistic ``reg``, bootstrap count, batch, statements ``path``
    ("" = the bundled statements)."""
    n_folds: int
    reg: float
    n_boot: int
    batch_size: int
    path: str


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "mesh": MeshConfig, "tasks": TasksConfig, "choices": ChoicesConfig,
    "activations": ActivationsConfig, "probes": ProbesConfig, "steering": SteeringConfig, "inlp": InlpConfig,
    "patching": PatchingConfig, "pref_shift": PrefShiftConfig, "truefalse": TrueFalseConfig,
}
# Top-level scalar keys, with their types. ``progress`` (bars on/off) is read by launch/main.py.
TOP_LEVEL = {"seed": "int", "stages": "tuple[str, ...]", "checkpoints_dir": "str", "adapters_dir": "str",
             "personas": "tuple[str, ...]", "truth": "str", "progress": "bool"}
# Sections that are kept for provenance (run.json) but not read by the pipeline: ``organism`` is the
# planting spec of configs/organism.py, read by bench/plant_organism.py through OrganismSpec.from_dict.
PROVENANCE = ("organism",)
ALLOWED = {"choices.mode": ("logit", "sample"), "steering.mode": ("contrastive", "single"),
           "probes.alpha_rule": ("best", "1se"), "model.split_layers": ("auto", "on", "off")}


def _convert(value: Any, kind: str, where: str) -> Any:
    """``value`` as the annotated type ``kind``; a clear error naming ``where`` otherwise."""
    def bad():
        return RunConfigError(f"config field {where!r} is {value!r} ({type(value).__name__}); expected {kind}")
    if kind.startswith("tuple["):
        inner = kind[6:-1].split(",")[0].strip()
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise bad()
        return tuple(_convert(v, inner, f"{where}[{k}]") for k, v in enumerate(value))
    if kind == "bool":
        if not isinstance(value, (bool, int)):
            raise bad()
        return bool(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad()
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if kind == "str":
        if value is None:
            return ""
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise bad()
        return str(value)
    raise RunConfigError(f"config field {where!r}: unsupported declared type {kind}")


def _as_mapping(node: Any, where: str) -> Mapping:
    if hasattr(node, "to_dict") and callable(node.to_dict):
        node = node.to_dict()
    if not isinstance(node, Mapping):
        raise RunConfigError(f"config section {where!r} is {type(node).__name__}, expected a mapping")
    return node


def build_section(cls: type, node: Any, name: str):
    """The dataclass ``cls`` of config section ``name`` from a mapping; undeclared or missing keys
    are an error naming the section and the declared keys."""
    node = _as_mapping(node, name)
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    extra = sorted(set(node) - set(fields))
    if extra:
        raise RunConfigError(f"config section {name!r} has undeclared key(s) {extra}; declared: {sorted(fields)}")
    missing = sorted(set(fields) - set(node))
    if missing:
        raise RunConfigError(f"config section {name!r} lacks key(s) {missing} (declare them in configs/common.py)")
    vals = {k: _convert(node[k], fields[k], f"{name}.{k}") for k in fields}
    for k, v in vals.items():
        allowed = ALLOWED.get(f"{name}.{k}")
        if allowed is not None and v not in allowed:
            raise RunConfigError(f"config field {name + '.' + k!r} is {v!r}; expected one of {list(allowed)}")
    return cls(**vals)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run config: top-level keys and one typed section each (see the section classes)."""
    seed: int
    stages: tuple[str, ...]
    checkpoints_dir: str
    adapters_dir: str
    personas: tuple[str, ...]
    truth: str
    progress: bool
    model: ModelConfig
    mesh: MeshConfig
    tasks: TasksConfig
    choices: ChoicesConfig
    activations: ActivationsConfig
    probes: ProbesConfig
    steering: SteeringConfig
    inlp: InlpConfig
    patching: PatchingConfig
    pref_shift: PrefShiftConfig
    truefalse: TrueFalseConfig
    organism: Mapping | None = None

    @classmethod
    def from_config(cls, config: Any) -> "RunConfig":
        """Build and validate from a (locked) ml_collections ConfigDict or a nested mapping.

        Every top-level key must be declared (:data:`TOP_LEVEL`, :data:`SECTIONS`, :data:`PROVENANCE`);
        a section with an undeclared or missing key is an error naming it; ``stages`` are checked
        (:func:`check_stages`) and returned in run order."""
        if isinstance(config, RunConfig):
            return config
        d = _as_mapping(config, "<root>")
        known = set(TOP_LEVEL) | set(SECTIONS) | set(PROVENANCE)
        extra = sorted(set(d) - known)
        if extra:
            raise RunConfigError(f"config has undeclared top-level key(s) {extra}; declared: {sorted(known)}")
        missing = sorted((set(TOP_LEVEL) | set(SECTIONS)) - set(d))
        if missing:
            raise RunConfigError(f"config lacks top-level key(s) {missing} (declare them in configs/common.py)")
        vals: dict[str, Any] = {k: _convert(d[k], kind, k) for k, kind in TOP_LEVEL.items()}
        vals["stages"] = check_stages(vals["stages"] or STAGES)  # empty = every stage
        for name, sec in SECTIONS.items():
            vals[name] = build_section(sec, d[name], name)
        if d.get("organism") is not None:
            vals["organism"] = json.loads(json.dumps(_as_mapping(d["organism"], "organism")))
        return cls(**vals)

    def to_dict(self) -> dict:
        """Plain nested dict (what ``run.json`` records and its fingerprint covers)."""
        out = dataclasses.asdict(self)
        if out["organism"] is None:
            del out["organism"]
        return out

    def persona_spec(self) -> list[str]:
        """``personas`` with relative ``adapter:NAME`` entries resolved under ``adapters_dir``."""
        return persona_spec(self.personas, self.adapters_dir)

    def mesh_shape(self) -> dict[str, int]:
        """``{data, fsdp, tensor, expert}`` sizes as named (0 read as 1; an auto mesh, every axis 0, reads
        as one device here: :func:`prefjax.preflight.resolve_mesh_shape` derives it from the devices)."""
        return {f.name: int(getattr(self.mesh, f.name) or 1) for f in dataclasses.fields(MeshConfig)}


def check_overrides(argv, flag: str = "config") -> None:
    """Refuse command-line overrides ``--config.<section>.<key>=...`` of keys the schema does not
    declare, naming the section and its declared keys (before the config file is even loaded)."""
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3:].split("=", 1)[0]
        head, _, rest = path.partition(".")
        if head in PROVENANCE:
            continue
        if head in TOP_LEVEL:
            if rest:
                raise RunConfigError(f"config override {arg!r}: {head!r} is a top-level key, not a section")
            continue
        if head not in SECTIONS:
            raise RunConfigError(f"config override {arg!r}: no section or top-level key {head!r}; declared: "
                                 f"{sorted(set(SECTIONS) | set(TOP_LEVEL))}")
        fields = [f.name for f in dataclasses.fields(SECTIONS[head])]
        if rest not in fields:
            raise RunConfigError(f"config override {arg!r}: section {head!r} has no key {rest!r}; "
                                 f"declared: {sorted(fields)}")


def persona_spec(personas, adapters_dir: str = "") -> list[str]:
    """Persona entries with relative ``adapter:NAME`` paths resolved under ``adapters_dir``."""
    out = []
    for item in personas:
        if isinstance(item, str) and item.startswith("adapter:") and adapters_dir and not os.path.isabs(item[8:]):
            item = "adapter:" + os.path.join(str(adapters_dir), item[8:])
        out.append(item)
    return out
