"""Where does a Gemma-3-27B decode step spend its time? One jitted forward of one token per row,
(a) without a KV cache (pure weight streaming + tiny attention), (b) with a 320-slot cache, each
with the layer scan and unrolled. Prints ms per step and the weight-bytes bandwidth they imply."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import prefjax
from prefjax.hooks import CaptureSpec
from _timing import median_seconds

preset = sys.argv[1] if len(sys.argv) > 1 else "gemma3-27b"
B, S = 8, 320
model = prefjax.load(preset, dtype="bfloat16")
cfg, fam, params = model.config, model.family, model.params
wbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
tok = jnp.asarray(np.random.RandomState(0).randint(10, 1000, size=(B, 1)), jnp.int32)
valid = jnp.ones((B, 1), bool)
spec = CaptureSpec()


def timeit(f, *a):
    return median_seconds(lambda: jax.block_until_ready(f(*a)), 10)


for unroll in (False, True):
    f = jax.jit(lambda p, t, v: fam.forward(cfg, p, t, v, capture=spec, unroll=unroll)[0])
    t = timeit(f, params, tok, valid)
    print(f"no cache   unroll={unroll}: {t * 1e3:7.2f} ms  ({wbytes / t / 1e9:6.0f} GB/s of weights)", flush=True)
    state = fam.init_state(cfg, B, S, jnp.bfloat16)
    state = {**state, "valid": state["valid"].at[:, :256].set(True)}
    g = jax.jit(lambda p, t, v, s: fam.forward(cfg, p, t, v, capture=spec, unroll=unroll, state=s, start=256)[0],
                donate_argnums=())
    t = timeit(g, params, tok, valid, state)
    print(f"cache {S}  unroll={unroll}: {t * 1e3:7.2f} ms  ({wbytes / t / 1e9:6.0f} GB/s of weights)", flush=True)
