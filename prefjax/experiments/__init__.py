"""Experiments of the seed paper beyond the core measurement, each as library functions plus a
``run_<name>_stage(section, run, model, pool, personas, ...)`` that the pipeline's stage table calls
with the experiment's own typed config section (:mod:`prefjax.runconfig`) and the run's workdir layout:

* :mod:`prefjax.experiments.steering` -- steering dose-response, probe direction vs a random one (the
  intervention itself is :mod:`prefjax.steering`);
* :mod:`prefjax.experiments.patching` -- end-of-turn activation patching (is the preference carried
  at the turn boundary?);
* :mod:`prefjax.experiments.pref_shift` -- do probe scores track utility shifts under a system prompt?
* :mod:`prefjax.experiments.truefalse` -- does a preference probe separate true from false statements?

Experiments import only the library (never :mod:`prefjax.pipeline` or the report); submodules are
imported on use, so importing this package costs nothing.
"""
