"""Report figures. Each function takes plain numpy/dicts, saves one PNG and returns its path.

matplotlib is imported lazily with the Agg backend, so these run headless (tests, clusters).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from prefjax.report.summary import wilson_interval

__all__ = ["utilities_by_topic", "probe_r_by_layer", "transfer_heatmap", "dose_response",
           "inlp_trajectory"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def utilities_by_topic(mu_by_persona: Mapping[str, np.ndarray], topics: Sequence[str], path: str,
                       *, title: str = "Utilities by topic") -> str:
    """Box + jittered points of task utilities per topic, one colour per persona.

    ``mu_by_persona[p]`` is ``mu_N`` (one utility per task); ``topics`` is the topic of each task
    (length N). Topics are ordered by the first persona's median utility.
    """
    if not mu_by_persona:
        raise ValueError("utilities_by_topic: mu_by_persona is empty")
    topics = np.asarray([str(t) for t in topics])
    for p, mu in mu_by_persona.items():
        if np.asarray(mu).shape != topics.shape:
            raise ValueError(f"utilities_by_topic: persona {p!r} has {np.asarray(mu).shape} utilities "
                             f"but there are {topics.shape[0]} topics")
    personas = list(mu_by_persona)
    first = np.asarray(mu_by_persona[personas[0]], dtype=np.float64)
    uniq = sorted(set(topics.tolist()),
                  key=lambda t: -np.nanmedian(first[topics == t]) if np.any(np.isfinite(first[topics == t])) else 0)
    plt = _plt()
    n_p = len(personas)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(uniq) * max(1, n_p) ** 0.5 + 2), 4.5))
    width = 0.8 / n_p
    rng = np.random.default_rng(0)
    cols = _colors(n_p)
    for pi, (p, col) in enumerate(zip(personas, cols)):
        mu = np.asarray(mu_by_persona[p], dtype=np.float64)
        data, pos = [], []
        for ti, t in enumerate(uniq):
            vals = mu[(topics == t) & np.isfinite(mu)]
            x = ti - 0.4 + width * (pi + 0.5)
            if vals.size:
                data.append(vals)
                pos.append(x)
                ax.scatter(x + rng.uniform(-0.3, 0.3, vals.size) * width, vals, s=8, color=col,
                           alpha=0.6, linewidths=0, zorder=3)
        if data:
            bp = ax.boxplot(data, positions=pos, widths=width * 0.8, patch_artist=True,
                            showfliers=False, manage_ticks=False)
            for box in bp["boxes"]:
                box.set_facecolor((*col[:3], 0.25))
                box.set_edgecolor(col)
            for part in ("whiskers", "caps", "medians"):
                for line in bp[part]:
                    line.set_color(col)
        ax.scatter([], [], color=col, label=p)
    ax.set_xticks(range(len(uniq)))
    ax.set_xticklabels(uniq, rotation=35, ha="right")
    ax.axhline(0, color="0.7", lw=0.8, zorder=0)
    ax.set_ylabel("utility μ")
    ax.set_title(title)
    if n_p > 1:
        ax.legend(title="persona", fontsize=8, frameon=False)
    return _save(fig, path)


def probe_r_by_layer(layers: Sequence[int], curves: Mapping[str, np.ndarray], path: str, *,
                     ylabel: str = "Pearson r", title: str = "Probe accuracy by layer",
                     bands: Mapping[str, tuple] | None = None) -> str:
    """One line per curve (e.g. ``heldout``, ``loto``, ``content_baseline``) against layer; ``bands``
    {curve name: (lo [L], hi [L])} shades an interval around that curve."""
    layers = np.asarray(layers)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    styles = {"heldout": "-o", "loto": "-s", "content_baseline": "--", "shuffled": ":"}
    for (name, r), col in zip(curves.items(), _colors(len(curves))):
        r = np.asarray(r, dtype=np.float64)
        if r.shape != layers.shape:
            raise ValueError(f"probe_r_by_layer: curve {name!r} has shape {r.shape}, layers {layers.shape}")
        ax.plot(layers, r, styles.get(name, "-^"), color=col, label=name, ms=4)
        if bands and name in bands:
            lo, hi = (np.asarray(v, dtype=np.float64) for v in bands[name])
            if lo.shape != layers.shape or hi.shape != layers.shape:
                raise ValueError(f"probe_r_by_layer: band {name!r} must have the layers' shape {layers.shape}")
            ax.fill_between(layers, lo, hi, color=col, alpha=0.15, lw=0)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def _heat(ax, m, labels, title, vmin, vmax, cmap="RdBu_r", lo=None, hi=None):
    """Heatmap with each cell's value written in it (up to 14 labels); with ``lo`` / ``hi`` (same shape)
    and up to 8 labels the cell also shows its interval ``[lo, hi]``."""
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_title(title)
    small = len(labels) <= 14
    with_ci = lo is not None and hi is not None and len(labels) <= 8
    for a in range(m.shape[0]):
        for b in range(m.shape[1]):
            v = m[a, b]
            if small:
                txt = "—" if not np.isfinite(v) else f"{v:.2f}"
                if with_ci and np.isfinite(v):
                    l, h = lo[a, b], hi[a, b]
                    txt += "\n[" + ("—" if not np.isfinite(l) else f"{l:.2f}") + ", " + \
                        ("—" if not np.isfinite(h) else f"{h:.2f}") + "]"
                dark = np.isfinite(v) and abs(v) > 0.6 * max(abs(vmin), abs(vmax))
                ax.text(b, a, txt, ha="center", va="center", fontsize=6 if with_ci else 7,
                        color="white" if dark else "black")
    return im


def transfer_heatmap(matrix: np.ndarray, labels: Sequence[str], path: str,
                     baseline: np.ndarray | None = None, *, title: str = "Probe transfer (r)",
                     baseline_title: str = "Utility correlation (baseline)", ci_lo=None, ci_hi=None) -> str:
    """Annotated train→test heatmap (rows: trained on, columns: tested on).

    With ``baseline`` (same shape, e.g. the correlation of the personas' utilities) a second
    panel shows it on the same colour scale. With ``ci_lo`` / ``ci_hi`` (same shape; None or NaN where
    undefined) each cell also shows its interval when there are at most 8 labels.
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    if m.shape != (n, n):
        raise ValueError(f"transfer_heatmap: matrix has shape {m.shape}, expected ({n}, {n}) for the labels")
    if (ci_lo is None) != (ci_hi is None):
        raise ValueError("transfer_heatmap: give both ci_lo and ci_hi, or neither")
    if ci_lo is not None:
        ci_lo, ci_hi = (np.array([[np.nan if v is None else v for v in row] for row in np.asarray(c, object)],
                                 np.float64) for c in (ci_lo, ci_hi))
        if ci_lo.shape != (n, n) or ci_hi.shape != (n, n):
            raise ValueError(f"transfer_heatmap: ci_lo / ci_hi have shapes {ci_lo.shape} / {ci_hi.shape}, "
                             f"expected ({n}, {n})")
    mats = [m]
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != (n, n):
            raise ValueError(f"transfer_heatmap: baseline has shape {b.shape}, expected ({n}, {n})")
        mats.append(b)
    finite = np.concatenate([x[np.isfinite(x)] for x in mats]) if any(np.isfinite(x).any() for x in mats) \
        else np.array([1.0])
    lim = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    plt = _plt()
    side = max(3.5, 0.45 * n + 2)
    fig, axes = plt.subplots(1, len(mats), figsize=(side * len(mats) + 0.8, side), squeeze=False)
    im = _heat(axes[0, 0], m, labels, title, -lim, lim, lo=ci_lo, hi=ci_hi)
    axes[0, 0].set_ylabel("trained on")
    axes[0, 0].set_xlabel("tested on")
    if baseline is not None:
        _heat(axes[0, 1], mats[1], labels, baseline_title, -lim, lim)
        axes[0, 1].set_yticklabels([])  # same rows as the left panel
        axes[0, 1].set_xlabel("persona")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    return _save(fig, path)


def _kn(obj, n_default, what):
    """Normalise a (k, n) spec: an array of counts (out of n_default), a (k, n) tuple or a dict."""
    label = None
    if isinstance(obj, Mapping):
        k, n, label = obj["k"], obj.get("n", n_default), obj.get("label")
    elif isinstance(obj, tuple) and len(obj) == 2:
        k, n = obj
    else:
        k, n = obj, n_default
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    if np.any(k > n) or np.any(k < 0):
        raise ValueError(f"dose_response: {what} counts must satisfy 0 <= k <= n")
    return k, n, label


def dose_response(coefs: Sequence[float], k: Sequence[int], n, path: str, *, refusal=None,
                  control=None, ylabel: str = "P(choose steered-towards task)",
                  title: str = "Steering dose-response") -> str:
    """Choice rate ``k/n`` against steering coefficient with Wilson 95% intervals.

    ``refusal`` (counts out of the same ``n``, a ``(k, n)`` tuple or ``{"k", "n", "label"}``)
    adds the refusal rate; ``control`` (same forms, e.g. a random direction) adds a dashed line.
    """
    x = np.asarray(coefs, dtype=np.float64)
    kk, nn, _ = _kn((k, n), None, "choice")
    if kk.shape != x.shape:
        raise ValueError(f"dose_response: k has shape {kk.shape} but coefs has {x.shape}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))

    def band(kv, nv, col, label, style):
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(nv > 0, kv / nv, np.nan)
        lo, hi = wilson_interval(kv, nv)
        ax.plot(x, rate, style, color=col, label=label, ms=4)
        ax.fill_between(x, lo, hi, color=col, alpha=0.2, lw=0)

    band(kk, nn, "C0", "choice rate", "-o")
    if control is not None:
        ck, cn, clab = _kn(control, nn, "control")
        if ck.shape != x.shape:
            raise ValueError(f"dose_response: control has shape {ck.shape} but coefs has {x.shape}")
        band(ck, cn, "0.45", clab or "control", "--s")
    if refusal is not None:
        rk, rn, rlab = _kn(refusal, nn, "refusal")
        if rk.shape != x.shape:
            raise ValueError(f"dose_response: refusal has shape {rk.shape} but coefs has {x.shape}")
        band(rk, rn, "C3", rlab or "refusal rate", ":^")
    ax.axhline(0.5, color="0.75", lw=0.8)
    ax.axvline(0.0, color="0.75", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("steering coefficient (× mean residual norm)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (95% Wilson CI)")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def inlp_trajectory(iters: Sequence[int], r_heldout, r_loto, r_shuffled, path: str, *,
                    title: str = "INLP: probe r as directions are removed") -> str:
    """Held-out, leave-one-topic-out and shuffled-label r against INLP iteration."""
    it = np.asarray(iters)
    curves = {"heldout": r_heldout, "loto": r_loto, "shuffled": r_shuffled}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for (name, r), style, col in zip(curves.items(), ("-o", "-s", ":x"), ("C0", "C1", "0.5")):
        r = np.asarray(r, dtype=np.float64)
        if r.shape != it.shape:
            raise ValueError(f"inlp_trajectory: {name} has shape {r.shape}, iters {it.shape}")
        ax.plot(it, r, style, color=col, label=name, ms=4)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("INLP iteration (directions removed)")
    ax.set_ylabel("Pearson r")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)
