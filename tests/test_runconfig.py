"""The typed run config: every key the code reads is declared in configs/common.py, typed in
prefjax.runconfig, and settable through launch/main.py's command-line override syntax."""

import dataclasses
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.common import base_config  # noqa: E402
from prefjax.runconfig import (PROVENANCE, SECTIONS, TOP_LEVEL, RunConfig, RunConfigError,  # noqa: E402
                               build_section, check_overrides)

DEFAULT_PY = os.path.join(ROOT, "configs", "default.py")


def parse_command_line(*overrides, arg="tiny"):
    """The config exactly as launch/main.py parses it (a locked config file flag), from ``overrides``."""
    argv = ["main.py", f"--config={DEFAULT_PY}:{arg}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", DEFAULT_PY, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def declared_keys() -> dict[str, str]:
    """Every declared key (``section.key`` or top-level) -> its declared type."""
    out = dict(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        out.update({f"{name}.{f.name}": f.type for f in dataclasses.fields(cls)})
    return out


# A new value (different from the tiny config's) and its command-line text, per declared key.
SPECIAL = {"stages": ("tasks", "patching"), "choices.mode": "sample", "steering.mode": "single", "probes.alpha_rule": "1se",
           "personas": ("default", "novelist"), "progress": False, "model.split_layers": "off"}


def _new_value(key, kind, old):
    if key in SPECIAL:
        return SPECIAL[key]
    if kind == "bool":
        return not old
    if kind == "int":
        return old + 3
    if kind == "float":
        return old + 0.5
    if kind == "str":
        return (old or "x") + "_y"
    if kind == "tuple[float, ...]":
        return tuple(old) + (0.25,)
    if kind == "tuple[str, ...]":
        return tuple(old) + ("extra",)
    raise AssertionError(f"no test value for {key} of type {kind}")


def _cli(value) -> str:
    if isinstance(value, tuple):
        return repr(value) if len(value) != 1 else f"({value[0]!r},)"
    return str(value)


def test_common_declares_exactly_the_typed_keys():
    c = base_config("tiny", "test")
    flat = {f"{k}.{kk}" if hasattr(v, "keys") else k
            for k, v in c.items() if k not in PROVENANCE for kk in (v.keys() if hasattr(v, "keys") else [None])}
    assert flat == set(declared_keys())
    # one source of defaults: the dataclasses declare types only
    for cls in list(SECTIONS.values()) + [RunConfig]:
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING and f.name not in PROVENANCE]
        assert not with_default, f"{cls.__name__} has defaults {with_default}; defaults live in configs/common.py"


def test_every_key_is_settable_from_the_command_line():
    base = RunConfig.from_config(parse_command_line())
    overrides, want = [], {}
    for key, kind in declared_keys().items():
        node = base
        for part in key.split("."):
            node = getattr(node, part)
        new = _new_value(key, kind, node)
        assert new != node, key
        want[key] = new
        overrides.append(f"--config.{key}={_cli(new)}")
    cfg = RunConfig.from_config(parse_command_line(*overrides))
    for key, new in want.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == new, f"{key}: {node!r} != {new!r}"


def test_misspelt_key_on_the_command_line_is_refused():
    with pytest.raises(Exception, match="n_pair"):
        parse_command_line("--config.patching.n_pair=3")
    with pytest.raises(Exception, match="pref_shif"):
        parse_command_line("--config.pref_shif.base=evil")


def test_launcher_check_names_the_section():
    check_overrides([f"--config.{k}=1" for k in declared_keys()] + ["--config.organism.steps=3", "--workdir=x"])
    with pytest.raises(RunConfigError, match=r"section 'patching' has no key 'n_pair'.*'n_pairs'"):
        check_overrides(["--config=configs/default.py", "--config.patching.n_pair=3"])
    with pytest.raises(RunConfigError, match=r"no section or top-level key 'pref_shif'"):
        check_overrides(["--config.pref_shif.base=evil"])
    with pytest.raises(RunConfigError, match=r"'seed' is a top-level key"):
        check_overrides(["--config.seed.x=1"])


def test_undeclared_missing_and_mistyped_keys_name_their_section():
    d = base_config("tiny", "test").to_dict()
    d["patching"]["n_pair"] = 3
    with pytest.raises(RunConfigError, match=r"section 'patching' has undeclared key\(s\) \['n_pair'\]"):
        RunConfig.from_config(d)
    d = base_config("tiny", "test").to_dict()
    del d["truefalse"]["path"]
    with pytest.raises(RunConfigError, match=r"section 'truefalse' lacks key\(s\) \['path'\]"):
        RunConfig.from_config(d)
    d = base_config("tiny", "test").to_dict()
    d["stepping"] = {}
    with pytest.raises(RunConfigError, match=r"undeclared top-level key\(s\) \['stepping'\]"):
        RunConfig.from_config(d)
    d = base_config("tiny", "test").to_dict()
    d["steering"]["n_pairs"] = "many"
    with pytest.raises(RunConfigError, match="'steering.n_pairs' is 'many'"):
        RunConfig.from_config(d)
    d["steering"]["n_pairs"] = 2.5
    with pytest.raises(RunConfigError, match="'steering.n_pairs' is 2.5"):
        RunConfig.from_config(d)
    with pytest.raises(RunConfigError, match="'choices.mode' is 'logits'"):
        build_section(SECTIONS["choices"], {**base_config("tiny", "t").choices.to_dict(), "mode": "logits"},
                      "choices")


def test_sections_are_frozen_and_typed():
    cfg = RunConfig.from_config(parse_command_line("--config.probes.alphas=(1,10)", "--config.steering.layer=3"))
    assert cfg.probes.alphas == (1.0, 10.0) and all(isinstance(a, float) for a in cfg.probes.alphas)
    assert cfg.steering.layer == "3" and cfg.stages[0] == "tasks"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probes.n_perm = 3
    assert RunConfig.from_config(cfg.to_dict()) == cfg  # run.json round-trips


def test_organism_block_is_kept_for_provenance():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_org_cfg", os.path.join(ROOT, "configs", "organism.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("small:/tmp/x")
    cfg = RunConfig.from_config(c)
    assert cfg.organism["steps"] == 600 and cfg.to_dict()["organism"]["steps"] == 600
    assert "organism" not in RunConfig.from_config(base_config("tiny", "t")).to_dict()
