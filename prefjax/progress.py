"""Progress bars and log lines, shown on process 0 only.

* ``progress(iterable, total=..., desc=...)`` wraps an iterable (tqdm when installed, else a plain
  line every ~10% / 30 s). ``progress(None, total=n)`` gives a bar with ``.update(k)`` and
  ``.close()`` for loops that advance by hand.
* ``log(msg)`` prints one line with a timestamp, on process 0 only.
* Set ``PREFJAX_PROGRESS=0`` to silence bars (``log`` still prints; ``PREFJAX_LOG=0`` silences it).
* ``Meter()`` measures a span of this process (host CPU seconds, XLA compiles and their seconds,
  peak device memory, peak host RSS); ``meter.record()`` gives them as a dict. The stage runner
  (:mod:`prefjax.stages`) stores one per stage in its ``.done`` record.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Iterable, Iterator

__all__ = ["process_index", "is_main_process", "progress_enabled", "progress", "log", "Progress",
           "Meter", "compile_totals", "peak_device_bytes", "peak_host_rss_bytes", "COMPILE_EVENTS"]


def process_index() -> int:
    """``jax.process_index()``, without ever initialising a JAX backend itself.

    Initialising one before ``jax.distributed.initialize()`` would break a multi-host start, so
    while neither has happened this returns 0 (which is what JAX would say then anyway).
    """
    try:
        import jax
    except Exception:
        return 0
    try:
        dist_ready = getattr(jax.distributed, "is_initialized", lambda: False)()
        if not dist_ready and _backends_initialized() is False:
            return 0
        return int(jax.process_index())
    except Exception:  # backend not initialisable: behave as a single process
        return 0


def _backends_initialized() -> bool | None:
    """Whether a JAX backend has been started in this process (None when that cannot be told)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # jax missing, or the private API moved
        return None


def is_main_process() -> bool:
    """True on process 0 (see ``process_index``)."""
    return process_index() == 0


def progress_enabled() -> bool:
    """Bars are shown on process 0 unless env ``PREFJAX_PROGRESS`` is ``0``/``false``/``off``."""
    flag = os.environ.get("PREFJAX_PROGRESS", "1").strip().lower()
    return flag not in ("0", "false", "off", "no") and is_main_process()


def log(msg: str) -> None:
    """Print ``[prefjax HH:MM:SS] msg`` to stderr on process 0 (silenced by ``PREFJAX_LOG=0``)."""
    if os.environ.get("PREFJAX_LOG", "1").strip().lower() in ("0", "false", "off", "no"):
        return
    if not is_main_process():
        return
    print(f"[prefjax {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Progress:
    """A minimal bar: ``update(n)``, ``close()``, usable as a context manager and an iterator."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, unit: str = "it"):
        self._iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.n = int(initial)
        self.unit = unit
        self._enabled = progress_enabled()
        self._bar = None
        self._t0 = time.time()
        self._last_print_t = 0.0
        self._last_print_frac = -1.0
        if self._enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, initial=initial, unit=unit,
                                 dynamic_ncols=True, file=sys.stderr)
            except Exception:
                self._bar = None

    def update(self, k: int = 1) -> None:
        """Advance by ``k`` items."""
        self.n += int(k)
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(int(k))
            return
        self._plain_print()

    def _plain_print(self, force: bool = False) -> None:
        now = time.time()
        frac = (self.n / self.total) if self.total else 0.0
        if not force and now - self._last_print_t < 30.0 and frac - self._last_print_frac < 0.1:
            return
        self._last_print_t, self._last_print_frac = now, frac
        rate = self.n / max(now - self._t0, 1e-9)
        tot = f"/{self.total}" if self.total else ""
        print(f"{self.desc or 'progress'}: {self.n}{tot} {self.unit} ({rate:.2f} {self.unit}/s)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar (prints a last line in plain mode)."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._plain_print(force=True)
        self._enabled = False

    def __iter__(self) -> Iterator:
        if self._iterable is None:
            raise TypeError("this Progress has no iterable; call update() instead")
        try:
            for x in self._iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "",
             initial: int = 0, unit: str = "it") -> Progress:
    """Wrap ``iterable`` in a bar shown on process 0 (or return a manual bar when it is None)."""
    return Progress(iterable, total=total, desc=desc, initial=initial, unit=unit)


# --------------------------------------------------------------------------------------------
# Measurements of a span of this process
# --------------------------------------------------------------------------------------------

#: JAX's compile-duration monitoring events (``jax._src.dispatch``: ``BACKEND_COMPILE_EVENT``,
#: ``JAXPR_TRACE_EVENT``, ``JAXPR_TO_MLIR_MODULE_EVENT`` in jax 0.10.2), mapped to the totals they
#: feed. The backend compile event fires once per XLA compilation (a persistent-cache hit included,
#: with the retrieval time as its duration); jit cache hits fire nothing.
COMPILE_EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}

_totals = {"compile_count": 0, "compile": 0.0, "trace": 0.0, "lower": 0.0}
_totals_lock = threading.Lock()
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    kind = COMPILE_EVENTS.get(event)
    if kind is None:
        return
    with _totals_lock:
        _totals[kind] += float(duration)
        if kind == "compile":
            _totals["compile_count"] += 1


def compile_totals() -> dict:
    """Process-wide totals since the listener was registered: ``compile_count`` (XLA compilations),
    ``compile`` / ``trace`` / ``lower`` seconds. The first call registers the listener with
    ``jax.monitoring`` (once per process; compiles before it are not counted)."""
    global _listening
    with _totals_lock:
        if not _listening:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
        return dict(_totals)


def peak_device_bytes() -> int | None:
    """The largest ``peak_bytes_in_use`` over this process's local devices since the process started
    (a high-water mark: never reset), or None when no backend is running, on devices that report no
    memory statistics (the CPU), or when asking fails. Never starts a backend itself."""
    if _backends_initialized() is not True:
        return None
    try:
        import jax

        stats = [d.memory_stats() for d in jax.local_devices()]
    except Exception:
        return None
    peaks = [int(s["peak_bytes_in_use"]) for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def peak_host_rss_bytes() -> int:
    """This process's peak resident set size in bytes since it started (``getrusage`` ``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


class Meter:
    """Measure a span of this process: ``m = Meter()`` at the start, ``m.record()`` at the end.

    ``record()`` returns ``wall_seconds``, ``host_seconds`` (``time.process_time``: CPU time of every
    thread of the process, so XLA's compile threads and, on the CPU backend, its compute too),
    ``compile_count`` / ``compile_seconds`` (XLA backend compilations in the span, any thread, from
    JAX's monitoring events), ``trace_seconds`` (tracing plus lowering to MLIR), and the process
    high-water marks at the end of the span, ``peak_device_bytes`` (None on the CPU) and
    ``peak_host_rss_bytes``: a span's own peak is at most these; they rise only when the span set a
    new peak.
    """

    def __init__(self):
        self._c0 = compile_totals()
        self._cpu0 = time.process_time()
        self._t0 = time.time()

    def record(self) -> dict:
        c = compile_totals()
        return {
            "wall_seconds": round(time.time() - self._t0, 3),
            "host_seconds": round(time.process_time() - self._cpu0, 3),
            "compile_count": int(c["compile_count"] - self._c0["compile_count"]),
            "compile_seconds": round(c["compile"] - self._c0["compile"], 6),
            "trace_seconds": round(c["trace"] + c["lower"] - self._c0["trace"] - self._c0["lower"], 6),
            "peak_device_bytes": peak_device_bytes(),
            "peak_host_rss_bytes": peak_host_rss_bytes(),
        }
