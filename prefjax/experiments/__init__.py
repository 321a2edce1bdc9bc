"""Experiments of the seed paper beyond the main pipeline, each as library functions plus a
``run_<name>_stage(cfg, run, model, pool, personas, ...)`` that the pipeline can call:

* :mod:`prefjax.experiments.patching` -- end-of-turn activation patching (is the preference carried
  at the turn boundary?);
* :mod:`prefjax.experiments.pref_shift` -- do probe scores track utility shifts under a system prompt?
* :mod:`prefjax.experiments.truefalse` -- does a preference probe separate true from false statements?

Submodules are imported lazily so importing this package costs nothing.
"""
