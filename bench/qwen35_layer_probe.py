"""Where a Qwen-3.5 MoE layer's time goes: each piece of one layer timed alone (prefjax only).

Random bf16 weights at a preset's shape (default Qwen3.5-122B-A10B). For a prompt (``batch x
prompt`` tokens) and a decode step (``batch`` tokens with a cache) it times, jitted, in ms:

* ``lin_layer`` / ``full_layer``: the whole forward of a one-layer model of that kind (embedding
  and final norm included, no logits);
* ``mlp``: the MoE block (router, routed experts, shared expert); ``experts``: the routed experts;
* ``lin_mixer``: the Gated DeltaNet mixer; ``rule``: the delta rule alone (chunked for the prompt,
  recurrent for decode);
* ``head``: the unembedding of one position per sequence.

    python bench/qwen35_layer_probe.py [--impl pallas]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from _timing import median_seconds


def _ms(fn, *args, repeats=10):
    import jax
    return 1e3 * median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


TUNE_DECODE = [dict(block=16), dict(block=16, bk=256), dict(block=16, bn=256, num_warps=8),
               dict(block=16, bk=128, num_stages=4), dict(block=16, bn=64, bk=256)]
TUNE_PREFILL = [dict(block=64), dict(block=32), dict(block=64, num_warps=8), dict(block=64, bk=128),
                dict(block=64, bn=256, num_warps=8), dict(block=64, bk=32, num_stages=4), dict(block=128),
                dict(block=64, num_stages=5)]


def tune(cfg, p0, h_p, h_d):
    """Print the routed-expert time (Pallas) for each tile choice, at both sizes."""
    import jax

    from prefjax.models import moe as M
    from prefjax.models import moe_pallas as MP
    for name, h, grid in (("decode", h_d, TUNE_DECODE), ("prompt", h_p, TUNE_PREFILL)):
        x = h.reshape(-1, h.shape[-1])
        w, i = M.route(x, p0["router"], cfg.top_k)
        args = (x, w, i, p0["experts_gate"], p0["experts_up"], p0["experts_down"])
        for kw in grid:
            try:
                t = _ms(jax.jit(lambda *a, kw=kw: MP.experts_pallas(*a, **kw)), *args)
                print(f"tune {name} {kw}: {t:.3f} ms", flush=True)
            except Exception as e:  # a tile choice the compiler refuses (shared memory, registers)
                print(f"tune {name} {kw}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen35-122b-a10b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--impl", default=None, help="MoE path (default: the backend's default)")
    ap.add_argument("--tune", action="store_true", help="also time the Pallas expert kernels over tile choices")
    ap.add_argument("--trace", default=None, help="write a profiler trace (perfetto json.gz) of the DeltaNet "
                    "layer's prompt and decode calls to this folder")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from prefjax.hooks import CaptureSpec
    from prefjax.models import deltanet as DN
    from prefjax.models import moe as M
    from prefjax.models import qwen35 as Q

    base = Q.PRESETS[args.preset]
    if args.impl:
        base = dataclasses.replace(base, moe_impl=args.impl)
    b, t = args.batch, args.prompt
    rs = np.random.RandomState(0)
    tokens = jnp.asarray(rs.randint(0, base.vocab_size, (b, t)).astype(np.int32))
    valid = jnp.ones((b, t), bool)
    rows = {}
    for kind in ("linear_attention", "full_attention"):
        cfg = dataclasses.replace(base, n_layers=1, layer_types=(kind,))
        params = jax.jit(lambda k, cfg=cfg: Q.init_params(cfg, k, jnp.bfloat16))(jax.random.PRNGKey(0))
        tag = "lin_layer" if kind == "linear_attention" else "full_layer"

        @jax.jit
        def prefill(params, tokens, cfg=cfg):
            return Q.forward(cfg, params, tokens, valid, capture=CaptureSpec(), logits=False, unroll=True)[2]

        @jax.jit
        def prefill_state(params, tokens, cfg=cfg):
            st = Q.init_state(cfg, b, t + 8, jnp.bfloat16)
            return Q.forward(cfg, params, tokens, valid, capture=CaptureSpec(), state=st, start=0,
                             logits=False, unroll=True)[3]

        @jax.jit
        def step(params, st, nxt, cfg=cfg):
            return Q.forward(cfg, params, nxt, jnp.ones((b, 1), bool), capture=CaptureSpec(), state=st, start=t,
                             is_prompt=False, logits=False, unroll=True)[2:]

        st = prefill_state(params, tokens)
        rows[tag] = (_ms(prefill, params, tokens), _ms(step, params, st, tokens[:, :1]))
        if args.trace and kind == "linear_attention":
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                for _ in range(2):
                    jax.block_until_ready(prefill(params, tokens))
                for _ in range(2):
                    jax.block_until_ready(step(params, st, tokens[:, :1]))
        p0 = jax.tree.map(lambda a: a[0], params["blocks"])
        h_p = jnp.take(params["embed"], tokens, axis=0) * 30.0
        h_d = h_p[:, :1]
        if kind == "linear_attention":
            mlp = jax.jit(lambda p, h: Q.mlp(cfg, p, h))
            rows["mlp"] = (_ms(mlp, p0, h_p), _ms(mlp, p0, h_d))

            def experts(p, h):
                x = h.reshape(-1, h.shape[-1])
                w, i = M.route(x, p["router"], cfg.top_k)
                return M.run_experts(Q.moe_impl(cfg), x, w, i, tuple(p[k] for k in M.EXPERT_WEIGHTS),
                                     jax.nn.silu)

            ex = jax.jit(experts)
            rows["experts"] = (_ms(ex, p0, h_p), _ms(ex, p0, h_d))
            if args.tune:
                tune(cfg, p0, h_p, h_d)
            lp = jax.tree.map(lambda a: a[0], params["lin"])
            mix = jax.jit(lambda p, h, v: Q.deltanet_mixer(cfg, p, h, v)[0])
            lst = {k: st[k][0] for k in ("conv_q", "conv_k", "conv_v", "rec")}
            mix_d = jax.jit(lambda p, h, s: Q.deltanet_mixer(cfg, p, h, jnp.ones((b, 1), bool), s, recurrent=True)[0])
            rows["lin_mixer"] = (_ms(mix, lp, h_p, valid), _ms(mix_d, lp, h_d, lst))
            hv, dk, dv = cfg.lin_n_v_heads, cfg.lin_k_dim, cfg.lin_v_dim
            ks = jax.random.split(jax.random.PRNGKey(1), 5)
            q = jax.random.normal(ks[0], (b, t, hv, dk), jnp.bfloat16)
            kk = jax.random.normal(ks[1], (b, t, hv, dk), jnp.bfloat16)
            v = jax.random.normal(ks[2], (b, t, hv, dv), jnp.bfloat16)
            g = -jax.random.uniform(ks[3], (b, t, hv))
            beta = jax.random.uniform(ks[4], (b, t, hv))
            s0 = jnp.zeros((b, hv, dk, dv), jnp.float32)
            rec = jax.jit(DN.recurrent_gated_delta_rule)
            t_rec = _ms(rec, q[:, :1], kk[:, :1], v[:, :1], g[:, :1], beta[:, :1], s0)
            for solve in ("doubling", "triangular"):
                ch = jax.jit(lambda *a, solve=solve: DN.chunk_gated_delta_rule(*a, chunk=cfg.chunk_size, solve=solve))
                rows[f"rule_{solve}"] = (_ms(ch, q, kk, v, g, beta, s0), t_rec)
            head = jax.jit(lambda params, h: Q.unembed(cfg, params, h))
            rows["head"] = (float("nan"), _ms(head, params, h_d))
        del params
    print(f"preset={args.preset} batch={b} prompt={t} impl={base.moe_impl} backend={jax.default_backend()} "
          f"device={jax.devices()[0].device_kind}")
    print(f"{'piece':14s}{'prompt ms':>12s}{'decode ms':>12s}")
    for k, (p, d) in rows.items():
        print(f"{k:14s}{p:12.3f}{d:12.3f}")
    return rows


if __name__ == "__main__":
    main()
