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


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)``; (0, 1) when JAX runs as a single process."""
    import jax
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op for a single process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
