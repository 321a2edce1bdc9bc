import os

# Tests compare float32 numerics against torch: make XLA's CPU dots full precision everywhere.
os.environ.setdefault("PREFJAX_PROGRESS", "0")
# libtpu (test extra, for the TPU ahead-of-time compiles) is installed but there is no TPU here: keep
# JAX on the CPU backend instead of probing for TPU chips in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
