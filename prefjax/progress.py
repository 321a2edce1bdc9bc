"""Progress bars and log lines, shown on process 0 only.

* ``progress(iterable, total=..., desc=...)`` wraps an iterable (tqdm when installed, else a plain
  line every ~10% / 30 s). ``progress(None, total=n)`` gives a bar with ``.update(k)`` and
  ``.close()`` for loops that advance by hand.
* ``log(msg)`` prints one line with a timestamp, on process 0 only.
* Set ``PREFJAX_PROGRESS=0`` to silence bars (``log`` still prints; ``PREFJAX_LOG=0`` silences it).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator

__all__ = ["process_index", "is_main_process", "progress_enabled", "progress", "log", "Progress"]


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
        if not dist_ready:
            try:
                from jax._src import xla_bridge

                if not xla_bridge.backends_are_initialized():
                    return 0
            except Exception:  # private API moved: fall through to asking jax
                pass
        return int(jax.process_index())
    except Exception:  # backend not initialisable: behave as a single process
        return 0


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
