"""One decode step's attention over a layer's KV cache, three ways (issue 16's B=64 gap).

Shapes: Gemma-3-27B's (16 KV heads x 128, 32 query heads), ``--batch`` rows, ``--slots`` cache slots,
bf16. Each call reads one layer's keys and values (``2 * B * S * K * H * 2`` bytes); the printed bound
is those bytes over the read bandwidth measured in the same run (a read-only reduction over 4 GiB), and
"x 62 layers" is what the attention would add to one decode step of the 62-layer model.

* ``einsum [B,S,K,H]``: the batched-matrix-product formulation (``dot_attention`` before 2026-11-30).
* ``decode_attention``: products summed in float32 (``prefjax.models.layers.decode_attention``).
* ``einsum [B,K,S,H]``: the matrix products on a cache stored heads-first (the layout a batched
  product wants; not prefjax's layout; for comparison).
* ``pallas b=.. w=..``: the Triton kernel of ``prefjax.models.decode_pallas`` (reads the cache in place,
  only each row's valid blocks; ``b`` slots per tile, ``w`` warps, splits chosen by the kernel).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` where it accepts the shapes.

Rows are contiguous runs of valid slots from slot 0 of random length in [S/3, S) (as the engine's rows
are); "bound" counts every slot's bytes, so a kernel that skips invalid blocks can pass 100%.

    python bench/attention_probe.py                 # on the GPU box
    python bench/attention_probe.py --cpu --batch 2 --slots 64   # smoke test
"""

import argparse
import json
import os

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
ap.add_argument("--slots", type=int, default=336)
ap.add_argument("--cpu", action="store_true")
ap.add_argument("--cudnn", action="store_true", help="also jax.nn.dot_product_attention(implementation='cudnn')")
ap.add_argument("--json", default=None, help="write {batch: {variant: seconds}} here")
args = ap.parse_args()
if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prefjax.models import decode_pallas  # noqa: E402
from prefjax.models.layers import NEG_INF, decode_attention  # noqa: E402
from _timing import median_seconds, read_bandwidth  # noqa: E402

K, G, H, LAYERS = 16, 2, 128, 62
SCALE = H ** -0.5


def einsum_attention(cache: str):
    """The batched-matmul attention on a cache laid out ``cache`` ("bskh" or "bksh")."""
    def attend(q, k, v, mask):
        b, t, n, h = q.shape
        q = q.reshape(b, t, K, G, h)
        s = jnp.einsum(f"btkgh,{cache}->bkgts", q, k) * jnp.asarray(SCALE, q.dtype)
        s = jnp.where(mask[:, :, None], s.astype(jnp.float32), NEG_INF)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        return jnp.einsum(f"bkgts,{cache}->btkgh", p, v).reshape(b, t, n, h)
    return attend


einsum_bskh, einsum_bksh = einsum_attention("bskh"), einsum_attention("bksh")


def main():
    dt = jnp.float32 if args.cpu else jnp.bfloat16
    bw = read_bandwidth(1 / 16 if args.cpu else 4.0)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; read bandwidth {bw / 1e9:.0f} GB/s; "
          f"{args.slots} slots, K={K} H={H} G={G}, {jnp.dtype(dt).name}")
    print(f"{'batch':>5} {'variant':<18} {'us/layer':>9} {'x62 ms':>7} {'bound us':>9} {'share':>6} {'max |diff|':>10}")
    results = {}
    for b in args.batch:
        rng = np.random.RandomState(b)
        q = jnp.asarray(rng.randn(b, 1, K * G, H), dt)
        k = jnp.asarray(rng.randn(b, args.slots, K, H), dt)
        v = jnp.asarray(rng.randn(b, args.slots, K, H), dt)
        mask = jnp.asarray(np.arange(args.slots)[None, None, None, :] < rng.randint(args.slots // 3, args.slots, (b, 1, 1, 1)))
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        ref = np.asarray(einsum_bskh(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask))
        nbytes = 2 * k.size * k.dtype.itemsize
        def kern(**kw):
            return lambda q_, k_, v_, m_: decode_pallas.decode_attention(q_, k_, v_, m_, scale=SCALE,
                                                                         interpret=args.cpu, **kw)
        variants = [("einsum [B,S,K,H]", einsum_bskh, k, v),
                    ("decode_attention", lambda *a: decode_attention(*a, SCALE), k, v),
                    ("einsum [B,K,S,H]", einsum_bksh, kt, vt)]
        for blk, warps, splits, products in ((32, 4, 0, "dot"), (64, 4, 0, "dot"), (64, 8, 0, "dot"),
                                             (64, 4, 1, "dot"), (128, 8, 0, "dot"), (32, 4, 0, "sum")):
            if args.slots % blk == 0 and not (args.cpu and warps == 8):
                variants.append((f"pallas {products} b={blk} w={warps}" + (f" p={splits}" if splits else ""),
                                 kern(block=blk, num_warps=warps, splits=splits, products=products), k, v))
        if args.cudnn:
            variants.append(("cudnn", lambda q_, k_, v_, m_: jax.nn.dot_product_attention(
                q_, k_, v_, mask=m_, scale=SCALE, implementation="cudnn"), k, v))
        results[b] = {}
        for name, fn, kk, vv in variants:
            f = jax.jit(fn)
            try:
                out = f(q, kk, vv, mask)
            except Exception as e:  # noqa: BLE001 - a variant the backend refuses is reported, not fatal
                print(f"{b:5d} {name:<26} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                continue
            diff = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
            t = median_seconds(lambda: f(q, kk, vv, mask).block_until_ready(), 20)
            bound = nbytes / bw
            results[b][name] = t
            print(f"{b:5d} {name:<26} {t * 1e6:9.1f} {t * LAYERS * 1e3:7.2f} {bound * 1e6:9.1f} "
                  f"{100 * bound / t:5.1f}% {diff:10.2e}", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


main()
