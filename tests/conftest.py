import os

# Tests compare float32 numerics against torch: make XLA's CPU dots full precision everywhere.
os.environ.setdefault("PREFJAX_PROGRESS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
