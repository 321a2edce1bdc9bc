"""Run (or resume) the whole prefjax pipeline for one config.

    python launch/main.py --config configs/default.py --workdir runs/default

Rerunning the same command resumes a killed run; a workdir written by a different config is refused.
On a pod, start one process per host: ``jax.distributed.initialize()`` runs when the launcher sees a
multi-process environment (or ``--distributed``), and only process 0 writes reports and progress.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prefjax.runconfig import RunConfigError, check_overrides  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where the run's stores, stages and report live.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CONFIG.value.progress:  # config.progress=False silences the progress bars (log lines stay)
        os.environ["PREFJAX_PROGRESS"] = "0"
    from prefjax.launching import maybe_initialize_distributed
    maybe_initialize_distributed(force=_DISTRIBUTED.value)
    from prefjax.pipeline import run_pipeline
    from prefjax.preflight import PreflightError
    try:
        report = run_pipeline(_CONFIG.value, _WORKDIR.value)
    except (PreflightError, RunConfigError) as e:  # bad input, found before any compute: the message, no trace
        sys.exit(f"FATAL {type(e).__name__}: {e}")
    import jax
    if jax.process_index() == 0:
        print(f"report: {report}", flush=True)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])  # a misspelt key names its section before anything loads
    except RunConfigError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    app.run(main)
