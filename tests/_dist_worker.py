"""Worker for tests/test_distributed.py: one process of a 2-process CPU run (or a 1-process reference).

    python tests/_dist_worker.py OUT.npz

Loads the random ``gemma3-tiny`` preset on a mesh over ``jax.devices()`` (data axis), runs one batch
sharded over data with captures, and (process 0) writes the gathered logits and captures to OUT.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out_path: str) -> None:
    from prefjax.launching import maybe_initialize_distributed
    multi = maybe_initialize_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import prefjax
    from prefjax.sharding import make_mesh

    if multi:
        assert jax.process_count() == int(os.environ["JAX_NUM_PROCESSES"]), jax.process_count()
    devices = jax.devices()
    mesh = make_mesh({"data": len(devices)}, devices)
    model = prefjax.load("gemma3-tiny", dtype="float32", mesh=mesh)
    rng = np.random.default_rng(0)
    B, T = 4, 12
    ids_BxT = rng.integers(3, model.config.vocab_size, size=(B, T)).astype(np.int32)
    mask_BxT = np.ones((B, T), np.int32)
    mask_BxT[1, :3] = 0  # one left-padded row
    hooks = ["blocks.0.hook_resid_post", f"blocks.{model.n_layers - 1}.hook_resid_post"]
    logits, cache = model.run(ids_BxT, attention_mask=mask_BxT, capture=hooks)
    gathered = {"logits": multihost_utils.process_allgather(logits, tiled=True)}
    for h in hooks:
        gathered[h] = multihost_utils.process_allgather(cache[h], tiled=True)
    info = np.asarray([jax.process_count(), len(devices), len(logits.sharding.device_set)])
    if jax.process_index() == 0:
        np.savez(out_path, info=info, **{k: np.asarray(v) for k, v in gathered.items()})
    print(f"process {jax.process_index()}: done, logits sharding {logits.sharding}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
