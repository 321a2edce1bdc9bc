import os

# Tests compare float32 numerics against torch: make XLA's CPU dots full precision everywhere.
os.environ.setdefault("PREFJAX_PROGRESS", "0")
# libtpu (test extra, for the TPU ahead-of-time compiles) is installed but there is no TPU here: keep
# JAX on the CPU backend instead of probing for TPU chips in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled XLA program when a test module ends. Each CPU executable keeps several memory
    mappings: one pytest process running the whole suite passed Linux's 65,530-mapping limit
    (vm.max_map_count) around the pipeline tests, and XLA then crashed inside a compile (segfault or
    abort). The engine tests alone reach ~15,000 mappings in 100 s."""
    yield
    jax.clear_caches()
    gc.collect()
