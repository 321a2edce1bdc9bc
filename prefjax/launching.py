"""Process setup for launches: multi-host initialisation and the mesh from a config."""

from __future__ import annotations

import os


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Call ``jax.distributed.initialize()`` when launched as several processes.

    Multi-process is detected from the variables JAX's cluster detection and our own tests use
    (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, SLURM, TPU pods), or
    forced with ``force=True``. Returns True when it initialised.
    """
    import jax
    coord = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coord and os.environ.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if force or os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
        return True
    return False
