"""The stage runner: a run is a workdir plus a config fingerprint; stages skip what is done.

```python
run = Run("runs/exp1", config_dict)          # writes run.json, or checks it matches

@run.stage("fit")                              # decorator: skipped on rerun, result reloaded
def fit():
    ...
    atomic_save_npz(run.stage_dir("fit") + "/mu.npz", mu=mu_N)
    return {"loss": float(loss)}

result = fit()

with run.stage("probe") as st:                 # context form: the body checks st.done itself
    if not st.done:
        st.result = {"r": 0.71}
print(st.result)
```

A stage's ``.done`` file (``stages/<name>.done``) is written atomically after its body returns
and holds its JSON result, so a stage killed mid-way runs again in full next time. Its record::

    {"stage", "result", "fingerprint", "finished", "seconds",      # wall seconds of the body
     "measured": {"wall_seconds", "host_seconds", "compile_count", "compile_seconds",
                  "trace_seconds", "peak_device_bytes", "peak_host_rss_bytes"}}

``measured`` (see :class:`prefjax.progress.Meter`) is written by the decorator and context forms;
records written before it existed, or by ``mark_done`` without a meter, lack it. Like ``seconds``
and ``finished`` it differs between runs of the same config. The two long
stages resume part-way through their own stores (the append-only comparisons store, the zarr3
activations store's committed-row counter).

:class:`RunLayout` owns every path a run writes (``layout.utilities(persona)``,
``layout.probe_dir(persona, layer)``, ...); :class:`Run` is a layout tied to a config. Nothing else
builds a path inside a workdir by hand.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from prefjax.hooks import hook_name
from prefjax.progress import Meter, log

__all__ = [
    "Run", "Stage", "StageConfigError", "SAFE_TO_CHANGE", "config_fingerprint", "config_diff",
    "atomic_write_json", "atomic_write_bytes", "atomic_save_npz", "to_jsonable", "read_json", "RunLayout",
    "resid_hook",
]

# Config fields that never change results: a bare name matches that key at any depth, a dotted
# name matches that exact path.
SAFE_TO_CHANGE: tuple[str, ...] = (
    "progress", "show_progress", "log_every", "log_level", "verbose", "num_workers",
    "workdir", "profile", "dry_run", "report_only", "notes",
)


class StageConfigError(RuntimeError):
    """The workdir was written by a config that differs in fields that change results."""


# ------------------------------------------------------------------------------------------
# JSON conversion and atomic writes
# ------------------------------------------------------------------------------------------

def to_jsonable(x: Any, *, nan_to_none: bool = False, _path: str = "", _nan_paths=None) -> Any:
    """Convert numpy/jax scalars and arrays, tuples, sets, dataclasses and paths to JSON types.

    With ``nan_to_none`` non-finite floats become None and their paths are appended to
    ``_nan_paths`` (a list) when given.
    """
    import dataclasses

    def rec(v, p):
        return to_jsonable(v, nan_to_none=nan_to_none, _path=p, _nan_paths=_nan_paths)

    if hasattr(x, "to_dict") and callable(x.to_dict) and not isinstance(x, np.ndarray):
        try:
            x = x.to_dict()  # ml_collections ConfigDict
        except TypeError:
            pass
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, Mapping):
        return {str(k): rec(v, f"{_path}.{k}" if _path else str(k)) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        seq = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        return [rec(v, f"{_path}[{n}]") for n, v in enumerate(seq)]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if type(x).__module__.startswith(("jax", "jaxlib")) and hasattr(x, "__array__"):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "fc" or x.dtype.name == "bfloat16":
            x = x.astype(np.float64)
        return rec(x.tolist(), _path)
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        if nan_to_none:
            if _nan_paths is not None:
                _nan_paths.append(_path or "<root>")
            return None
        return x
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"value at {_path or '<root>'!r} of type {type(x).__name__} is not JSON-serialisable")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (tmp file, fsync, ``os.replace``, dir fsync)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 2, nan: str = "error") -> str:
    """Write ``obj`` (converted by ``to_jsonable``) as JSON, atomically.

    Non-finite floats raise ValueError naming their paths (``nan="error"``) or are written as null
    with a log line (``nan="null"``).
    """
    if nan not in ("error", "null"):
        raise ValueError(f"nan must be 'error' or 'null', got {nan!r}")
    nan_paths: list[str] = []
    conv = to_jsonable(obj, nan_to_none=True, _nan_paths=nan_paths)
    if nan_paths:
        shown = ", ".join(nan_paths[:10]) + (" ..." if len(nan_paths) > 10 else "")
        if nan == "error":
            raise ValueError(f"non-finite value(s) at {shown} cannot be written to {path!r}")
        log(f"warning: {len(nan_paths)} non-finite value(s) written as null to {path}: {shown}")
    text = json.dumps(conv, indent=indent, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_save_npz(path: str, **arrays) -> str:
    """``np.savez`` to ``path`` atomically (the name is used as given; add ``.npz`` yourself)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def read_json(path: str):
    """The parsed JSON file at ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------
# Config fingerprint
# ------------------------------------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _is_safe(path: str, safe: Sequence[str]) -> bool:
    parts = path.split(".")
    for s in safe:
        if "." in s:
            if path == s or path.startswith(s + "."):
                return True
        elif s in parts:
            return True
    return False


def _relevant(config: Mapping, safe: Sequence[str]) -> dict[str, Any]:
    flat = _flatten(to_jsonable(config))
    return {k: v for k, v in flat.items() if not _is_safe(k, safe)}


def config_fingerprint(config: Mapping, safe: Sequence[str] = SAFE_TO_CHANGE) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of the config minus safe fields."""
    rel = _relevant(config, safe)
    blob = json.dumps(rel, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def config_diff(old: Mapping, new: Mapping, safe: Sequence[str] = SAFE_TO_CHANGE) -> list[str]:
    """Dotted paths of result-changing fields that differ, as ``"path: old -> new"`` lines."""
    a, b = _relevant(old, safe), _relevant(new, safe)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: {va!r:.120} -> {vb!r:.120}")
    return out


# ------------------------------------------------------------------------------------------
# Run and stages
# ------------------------------------------------------------------------------------------

def resid_hook(layer: int) -> str:
    """The residual-stream hook name of a layer (what activations and probes are keyed by)."""
    return hook_name(int(layer), "hook_resid_post")


class RunLayout:
    """Every path inside a run's workdir, in one place. Paths only: nothing is created or checked,
    except :meth:`stage_dir` (created on demand). Use it to read a finished workdir; :class:`Run`
    adds the config check and the stage markers.

    Layout::

        run.json                          config + fingerprint
        stages/<stage>.done               a finished stage's JSON result
        stages/tasks/tasks.jsonl          the task pool of the run
        stages/utilities/<persona>.npz    Thurstonian mu, sigma
        stages/<stage>/<file>             other stages' arrays (transfer, steering, patching, truefalse)
        comparisons/                      the append-only comparisons store
        activations/<persona>/            zarr3 activation store (host_<i>/ per process on a pod)
        probes/<persona>/<hook>/          the best layer's saved ridge probe
        figures/<name>.png, summary.json, report.md
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(os.fspath(workdir))

    @property
    def run_json(self) -> str:
        """``run.json``: the config and its fingerprint."""
        return os.path.join(self.workdir, "run.json")

    @property
    def stages_dir(self) -> str:
        """``stages/``: done markers and per-stage output folders."""
        return os.path.join(self.workdir, "stages")

    def stage_dir(self, name: str) -> str:
        """``stages/<name>/``, created on demand, for a stage's output files."""
        d = os.path.join(self.stages_dir, _check_name(name))
        os.makedirs(d, exist_ok=True)
        return d

    def stage_file(self, stage: str, filename: str) -> str:
        """``stages/<stage>/<filename>`` (the folder created on demand)."""
        return os.path.join(self.stage_dir(stage), _check_name(filename))

    def done_path(self, name: str) -> str:
        """``stages/<name>.done``."""
        return os.path.join(self.stages_dir, f"{_check_name(name)}.done")

    def tasks_file(self) -> str:
        """The run's task pool, ``stages/tasks/tasks.jsonl``."""
        return os.path.join(self.stages_dir, "tasks", "tasks.jsonl")

    def utilities(self, persona: str) -> str:
        """``stages/utilities/<persona>.npz`` (``mu``, ``sigma``)."""
        return os.path.join(self.stages_dir, "utilities", f"{persona}.npz")

    def comparisons_dir(self) -> str:
        """The comparisons store, ``comparisons/``."""
        return os.path.join(self.workdir, "comparisons")

    def activations_dir(self, persona: str) -> str:
        """The activation store of a persona, ``activations/<persona>/``."""
        return os.path.join(self.workdir, "activations", persona)

    def probes_dir(self, persona: str) -> str:
        """The saved probes of a persona, ``probes/<persona>/``."""
        return os.path.join(self.workdir, "probes", persona)

    def probe_dir(self, persona: str, layer: int) -> str:
        """The saved probe of a persona at a layer, ``probes/<persona>/blocks.<layer>.hook_resid_post/``."""
        return os.path.join(self.probes_dir(persona), resid_hook(layer))

    def figures_dir(self) -> str:
        """``figures/``."""
        return os.path.join(self.workdir, "figures")

    def figure(self, name: str) -> str:
        """``figures/<name>`` (a file name such as ``steering.png``)."""
        return os.path.join(self.figures_dir(), _check_name(name))

    def summary_json(self) -> str:
        """``summary.json`` (written with the report)."""
        return os.path.join(self.workdir, "summary.json")

    def report_md(self) -> str:
        """``report.md``."""
        return os.path.join(self.workdir, "report.md")

    def is_done(self, name: str) -> bool:
        """Whether ``stages/<name>.done`` exists."""
        return os.path.exists(self.done_path(name))

    def result(self, name: str) -> Any:
        """The saved result of a finished stage (KeyError naming it if not done)."""
        if not self.is_done(name):
            raise KeyError(f"stage {name!r} is not done in {self.workdir!r}")
        return read_json(self.done_path(name))["result"]

    def done_records(self) -> list[dict]:
        """Every ``stages/*.done`` marker of this run (``stage``, ``result``, ``finished``, ``seconds``, ...),
        in no particular order; a marker that cannot be read is left out."""
        out = []
        for entry in sorted(os.listdir(self.stages_dir)) if os.path.isdir(self.stages_dir) else []:
            if entry.endswith(".done"):
                try:
                    d = read_json(os.path.join(self.stages_dir, entry))
                except (OSError, ValueError):
                    continue
                d.setdefault("stage", entry[:-len(".done")])
                out.append(d)
        return out


class Run(RunLayout):
    """A workdir tied to one config. ``Run(workdir, config)`` writes or checks ``run.json``.

    Raises StageConfigError listing every differing field when the workdir holds a run of a
    config that differs in a field not named in ``safe_to_change``.
    """

    def __init__(self, workdir: str, config: Mapping[str, Any], *,
                 safe_to_change: Sequence[str] = SAFE_TO_CHANGE):
        super().__init__(workdir)
        self.safe_to_change = tuple(safe_to_change)
        self.config = to_jsonable(config)
        self.fingerprint = config_fingerprint(self.config, self.safe_to_change)
        run_json = self.run_json
        if os.path.exists(run_json):
            old = read_json(run_json)
            old_cfg = old.get("config", {})
            if old.get("fingerprint") != self.fingerprint or config_diff(old_cfg, self.config,
                                                                          self.safe_to_change):
                diff = config_diff(old_cfg, self.config, self.safe_to_change)
                lines = "\n  ".join(diff) if diff else "(fingerprint differs; safe-field list changed?)"
                raise StageConfigError(
                    f"workdir {self.workdir!r} was written by a different config "
                    f"(fingerprint {old.get('fingerprint')} vs {self.fingerprint}); differing fields:\n"
                    f"  {lines}\nUse a new workdir, or delete {run_json} and the stages you want redone.")
        else:
            os.makedirs(self.workdir, exist_ok=True)
            atomic_write_json(run_json, {"fingerprint": self.fingerprint, "config": self.config,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        os.makedirs(self.stages_dir, exist_ok=True)

    def mark_done(self, name: str, result: Any = None, started: float | None = None,
                  meter: Meter | None = None) -> dict:
        """Write ``stages/<name>.done`` (atomically) holding ``result``; with ``meter`` (started with
        the stage) also its ``measured`` dict (host CPU seconds, compiles, peak memory). Returns the
        record as written (before JSON conversion)."""
        now = time.time()
        rec = {"stage": name, "result": result, "fingerprint": self.fingerprint,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "seconds": None if started is None else round(now - started, 3)}
        if meter is not None:
            rec["measured"] = meter.record()
        atomic_write_json(self.done_path(name), rec, nan="null")
        return rec

    def invalidate(self, name: str) -> None:
        """Forget that a stage is done (its output files are left in place)."""
        try:
            os.remove(self.done_path(name))
        except FileNotFoundError:
            pass

    def stage(self, name: str) -> "Stage":
        """A stage handle usable as a decorator or a context manager (see module doc)."""
        return Stage(self, name)


def _measured_note(rec: Mapping) -> str:
    """`` (host cpu 3.1s; 2 XLA compiles, 0.8s)`` for a stage's log line ('' without measurements)."""
    m = rec.get("measured") or {}
    if not m:
        return ""
    return f" (host cpu {m['host_seconds']:.1f}s; {m['compile_count']} XLA compiles, {m['compile_seconds']:.1f}s)"


def _check_name(name: str) -> str:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"bad stage name {name!r}: use a plain file name")
    return name


class Stage:
    """One named stage of a Run. ``done``/``result`` reflect ``stages/<name>.done``."""

    def __init__(self, run: Run, name: str):
        self.run = run
        self.name = _check_name(name)
        self.done = run.is_done(name)
        self.result = run.result(name) if self.done else None
        self._t0: float | None = None
        self._meter: Meter | None = None

    @property
    def dir(self) -> str:
        return self.run.stage_dir(self.name)

    def path(self, filename: str) -> str:
        """A path inside this stage's output folder."""
        return os.path.join(self.dir, filename)

    # decorator form ------------------------------------------------------------------------
    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.run.is_done(self.name):
                log(f"stage {self.name}: done already, skipping")
                self.done, self.result = True, self.run.result(self.name)
                return self.result
            log(f"stage {self.name}: running")
            t0, meter = time.time(), Meter()
            out = fn(*args, **kwargs)
            rec = self.run.mark_done(self.name, out, started=t0, meter=meter)
            self.done, self.result = True, self.run.result(self.name)
            log(f"stage {self.name}: done in {time.time() - t0:.1f}s{_measured_note(rec)}")
            return self.result

        return wrapped

    # context-manager form ------------------------------------------------------------------
    def __enter__(self) -> "Stage":
        self._t0, self._meter = time.time(), Meter()
        log(f"stage {self.name}: " + ("done already, skipping" if self.done else "running"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.done:
            return None
        rec = self.run.mark_done(self.name, self.result, started=self._t0, meter=self._meter)
        self.result = self.run.result(self.name)
        self.done = True
        log(f"stage {self.name}: done in {time.time() - (self._t0 or time.time()):.1f}s{_measured_note(rec)}")
        return None
