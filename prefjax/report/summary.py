"""The written report: ``summary.json`` plus a ``report.md`` with a headline table first.

``write_report(workdir, summary, figures, sections)`` converts numpy scalars/arrays to JSON
types, writes non-finite numbers as null (with a warning naming them), and lays out:

1. a headline table (``summary["headline"]`` when it is a dict, else the top-level scalars),
2. the figures (relative links),
3. the caller's sections (title, markdown),
4. the remaining summary values (nested dicts flattened to dotted keys, lists truncated).

``wilson_interval`` is re-exported from :mod:`prefjax.stats_small` for the dose-response figure.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from prefjax.stages import RunLayout, atomic_write_bytes, atomic_write_json, to_jsonable
from prefjax.stats_small import wilson_interval

__all__ = ["wilson_interval", "write_report", "format_value"]


def format_value(v: Any) -> str:
    """A short human string: floats to 4 significant digits, None as '—', lists abbreviated."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return "—"
        if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
            return f"{f:.3e}"
        return f"{f:.4g}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(format_value(x) for x in v[:6])
        return f"[{inner}{', …' if len(v) > 6 else ''}] (n={len(v)})" if len(v) > 6 else f"[{inner}]"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]], head=("quantity", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    for k, v in rows:
        lines.append(f"| {_md_escape(str(k))} | {_md_escape(format_value(v))} |")
    return "\n".join(lines)


def write_report(workdir: str, summary: Mapping[str, Any], figures: Mapping[str, str] | None = None,
                 sections: Sequence[tuple[str, str]] = (), *, title: str = "prefjax report",
                 footer: Sequence[tuple[str, str]] = (), preamble: str = "") -> str:
    """Write ``summary.json`` and ``report.md`` into ``workdir``; return the report's path.

    ``preamble`` (markdown) opens the report, under the title and before the headline table: the place
    for what a reader must know first (e.g. what is and is not distinguishable from the nulls).
    ``footer`` sections (title, markdown) close the report, after the summary values. A top-level
    ``timing`` entry of ``summary`` goes to ``summary.json`` only (the caller shows it, e.g. in a footer).
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    layout = RunLayout(workdir)
    atomic_write_json(layout.summary_json(), summary, nan="null")
    clean = to_jsonable(summary, nan_to_none=True)

    head = clean.get("headline") if isinstance(clean.get("headline"), Mapping) else None
    if head is not None:
        headline_rows = list(_flatten(head).items())
        rest = {k: v for k, v in clean.items() if k not in ("headline", "timing")}
    else:
        headline_rows = [(k, v) for k, v in clean.items() if _is_scalar(v)]
        rest = {k: v for k, v in clean.items() if not _is_scalar(v) and k != "timing"}

    parts = [f"# {title}", ""]
    if preamble.strip():
        parts += [preamble.strip(), ""]
    parts += ["## Headline", "", _table(headline_rows) if headline_rows else "_(no headline values)_", ""]
    if figures:
        parts += ["## Figures", ""]
        for name, p in figures.items():
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(workdir))
            parts += [f"**{name}**", "", f"![{name}]({rel})", ""]
    for sec_title, body in sections:
        parts += [f"## {sec_title}", "", body.strip(), ""]
    flat_rest = _flatten(rest)
    if flat_rest:
        parts += ["## All summary values", "", _table(list(flat_rest.items()), ("key", "value")), ""]
    parts += ["_Full values: `summary.json`._", ""]
    for sec_title, body in footer:
        parts += [f"## {sec_title}", "", body.strip(), ""]
    path = layout.report_md()
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
