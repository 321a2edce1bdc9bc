"""Content-only baseline features: what a probe can read from the task text alone.

A preference probe on residual activations is only interesting where it beats a probe on features
that see nothing but the task's tokens; :func:`content_embeddings` gives those features.
"""

from __future__ import annotations

import numpy as np


def content_embeddings(model, pool) -> np.ndarray:
    """Mean input-embedding vector of each task's prompt tokens, ``[len(pool), d_model]`` float32."""
    emb = np.asarray(model.params["embed"], np.float32)
    out = np.zeros((len(pool), emb.shape[1]), np.float32)
    for r, t in enumerate(pool):
        ids = model.tokenizer.encode(t.prompt, add_bos=False)
        out[r] = emb[np.asarray(ids)].mean(0)
    return out
