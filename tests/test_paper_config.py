"""configs/paper.py and the checks that run before a run's workdir exists (prefjax.preflight).

Each bad input (task file unset, ``tasks.n`` above the pool, a checkpoint whose config.json is not
``model.preset``'s shape, a named mesh that does not fit the devices) is an error naming the config
field and leaves no workdir behind; the same input made right passes the check. The auto mesh is
checked on this process's one CPU device and, in a subprocess, on 8 fake CPU devices.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.common import MODELS  # noqa: E402
from configs.paper import get_config  # noqa: E402
from prefjax.runconfig import STAGES, RunConfig, RunConfigError  # noqa: E402

PAPER_ROWS = ("tiny", "gemma3-4b", "gemma3-12b", "gemma3-27b", "qwen35-122b-a10b", "llama31-8b")
CHECKPOINT_ROWS = PAPER_ROWS[1:]


def _task_file(tmp_path, n: int) -> str:
    """A JSONL task file of ``n`` tasks drawn from the bundled pool (a user's file, as far as the run knows)."""
    from prefjax.tasks import load_default_pool, save_jsonl
    path = str(tmp_path / "tasks.jsonl")
    save_jsonl(load_default_pool().subset(n, seed=0, stratified=True), path)
    return path


def _checkpoint(folder, preset: str, **edit) -> str:
    """A Hugging Face folder holding only the config.json of Gemma-3 ``preset`` (fields edited by ``edit``)."""
    from prefjax.models.gemma3 import PRESETS, hf_config
    return _write_config(folder, dict(hf_config(PRESETS[preset]), **edit))


def _write_config(folder, hf: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(folder)


def _refused(config, workdir, match: str, exc=ValueError):
    """run_pipeline(config) raises ``exc`` matching ``match`` and leaves no workdir."""
    from prefjax.pipeline import run_pipeline
    with pytest.raises(exc, match=match):
        run_pipeline(config, str(workdir))
    assert not os.path.exists(workdir), f"{workdir} was created before the input check failed"


# ---------------------------------------------------------------------------------------------
# The config

@pytest.mark.parametrize("arg", PAPER_ROWS)
def test_paper_config_holds_the_protocol(arg):
    c = get_config(arg)
    if arg != "tiny":
        c.tasks.source = "tasks.jsonl"
    cfg = RunConfig.from_config(c)
    row = MODELS[arg]
    assert cfg.stages == STAGES
    assert cfg.choices.samples == 5
    assert cfg.choices.mode == ("logit" if arg == "tiny" else "sample")  # random tiny weights never parse
    assert cfg.activations.layers == "all"
    assert cfg.personas == row.personas and len(cfg.personas) >= 2
    assert "steering" in cfg.stages and len(cfg.steering.coefs) >= 3 and cfg.steering.n_pairs >= 1
    assert cfg.model.preset == row.preset
    if arg in CHECKPOINT_ROWS:
        assert cfg.mesh.auto, f"{arg}: the checkpoint rows derive their mesh from the devices"
        assert cfg.tasks.n == 0 and cfg.model.source.endswith("/" + row.source)


def test_paper_tiny_builds_a_valid_run_config():
    from prefjax.pipeline import check_cv_folds, load_task_pool
    cfg = RunConfig.from_config(get_config("tiny"))
    pool = load_task_pool(cfg.tasks)
    assert len(pool) == cfg.tasks.n
    check_cv_folds(len(pool), cfg.probes.cv_outer, cfg.probes.cv_inner)
    assert get_config("").model.name == "gemma3-27b"  # the paper's model is the default row


def test_paper_config_launch_command_parses(tmp_path):
    """The docstring's command line, parsed as launch/main.py parses it (locked config file flag)."""
    from absl import flags
    from ml_collections import config_flags
    path = os.path.join(ROOT, "configs", "paper.py")
    argv = ["main.py", f"--config={path}:gemma3-27b", "--config.tasks.source=tasks.jsonl",
            "--config.checkpoints_dir=/ckpt"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    cfg = RunConfig.from_config(fv.config)
    assert cfg.model.source == "/ckpt/gemma-3-27b-it" and cfg.tasks.source == "tasks.jsonl"
    import configs.paper
    assert "--config.tasks.source=tasks.jsonl" in configs.paper.__doc__


# ---------------------------------------------------------------------------------------------
# Bad input, refused before the workdir

def test_unset_task_source_is_refused(tmp_path):
    c = get_config("gemma3-27b")
    c.checkpoints_dir = str(tmp_path / "ckpt")
    _refused(c, tmp_path / "run", r"tasks\.source.*--config\.tasks\.source=<file\.jsonl\|csv>")


def test_tasks_n_above_the_pool_names_both_numbers(tmp_path):
    from prefjax.pipeline import load_task_pool
    n_file = 30
    c = get_config("tiny")
    c.tasks.source = _task_file(tmp_path, n_file)
    c.tasks.n = n_file + 7
    _refused(c, tmp_path / "run", rf"tasks\.n' is {n_file + 7} .* has {n_file} tasks")
    c.tasks.n = n_file  # the whole file: accepted
    assert len(load_task_pool(RunConfig.from_config(c).tasks)) == n_file
    c.tasks.n = 0
    assert len(load_task_pool(RunConfig.from_config(c).tasks)) == n_file


def test_checkpoint_shape_not_the_preset_is_refused(tmp_path):
    """A 12B config.json under the 27B row's folder: refused naming each field and both values; the
    27B config.json passes the check (the run then stops at the weights, past the workdir)."""
    from prefjax.models.gemma3 import PRESETS
    ckpt = tmp_path / "ckpt"
    c = get_config("gemma3-27b")
    c.checkpoints_dir = str(ckpt)
    c.tasks.source = _task_file(tmp_path, 30)
    folder = ckpt / MODELS["gemma3-27b"].source
    _checkpoint(folder, "gemma3-12b")
    big, small = PRESETS["gemma3-27b"], PRESETS["gemma3-12b"]
    _refused(c, tmp_path / "run", rf"model\.preset' 'gemma3-27b'.*d_model \(config\.json hidden_size\) is "
                                  rf"{small.d_model} in the checkpoint, {big.d_model} in the preset.*"
                                  rf"n_layers \(config\.json num_hidden_layers\) is {small.n_layers}")
    # one field off is enough
    _checkpoint(folder, "gemma3-27b", intermediate_size=big.d_ff + 128)
    _refused(c, tmp_path / "run", rf"d_ff \(config\.json intermediate_size\) is {big.d_ff + 128} in the "
                                  rf"checkpoint, {big.d_ff} in the preset")
    # the matching shape passes every check; loading then fails on the (absent) weights
    from prefjax.pipeline import run_pipeline
    _checkpoint(folder, "gemma3-27b")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        run_pipeline(c, str(tmp_path / "run"))
    assert os.path.isdir(tmp_path / "run")


def test_checkpoint_of_another_family_or_missing_is_refused(tmp_path):
    from prefjax.preflight import PreflightError, check_model_source
    c = get_config("tiny")
    c.model.preset = "gemma3-tiny-tok"
    from prefjax.models.llama import PRESETS
    ll = PRESETS["llama31-tiny"]
    c.model.source = _write_config(tmp_path / "llama", {
        "model_type": "llama", "vocab_size": ll.vocab_size, "hidden_size": ll.d_model,
        "num_hidden_layers": ll.n_layers, "num_attention_heads": ll.n_heads, "num_key_value_heads": ll.n_kv_heads,
        "intermediate_size": ll.d_ff, "head_dim": ll.head_dim, "hidden_act": "silu"})
    with pytest.raises(PreflightError, match=r"llama checkpoint but config field 'model\.preset' is 'gemma3-tiny-tok'"):
        check_model_source(RunConfig.from_config(c).model)
    c.model.source = _checkpoint(tmp_path / "gemma", "gemma3-tiny-tok")
    check_model_source(RunConfig.from_config(c).model)  # same shape: passes
    c.model.source = str(tmp_path / "nowhere" / "gemma-3-27b-it")
    _refused(c, tmp_path / "run", r"model\.source' is .*nowhere.* does not exist")


def test_named_mesh_that_does_not_fit_is_refused(tmp_path):
    import jax
    n = len(jax.local_devices())
    c = get_config("tiny")
    c.mesh.fsdp = n * 8
    _refused(c, tmp_path / "run", rf"config field 'mesh' names the mesh \{{'fsdp': {n * 8}\}} of {n * 8} devices, "
                                  rf"but this process has {n} cpu device")


def test_bad_mesh_and_task_counts_are_config_errors():
    c = get_config("tiny")
    c.mesh.tensor = -1
    with pytest.raises(RunConfigError, match=r"mesh\.tensor"):
        RunConfig.from_config(c)
    c = get_config("tiny")
    c.tasks.n = -2
    with pytest.raises(RunConfigError, match=r"tasks\.n"):
        RunConfig.from_config(c)


# ---------------------------------------------------------------------------------------------
# The mesh

def test_auto_mesh_on_one_device_is_no_mesh():
    import jax
    from prefjax.pipeline import config_mesh
    c = get_config("gemma3-27b")
    c.tasks.source = "tasks.jsonl"
    cfg = RunConfig.from_config(c)
    assert cfg.mesh.auto
    assert config_mesh(cfg, jax.local_devices()[:1]) is None
    assert config_mesh(RunConfig.from_config(get_config("tiny"))) is None  # a product-1 mesh: one device


@pytest.mark.parametrize("n", (2, 3, 4, 6, 8, 16, 64))
def test_auto_mesh_shape_rules(n):
    from prefjax.sharding import auto_mesh_shape
    assert auto_mesh_shape(1, 0) is None and auto_mesh_shape(1, 256) is None
    assert auto_mesh_shape(n, 0) == {"fsdp": n}
    for experts in (8, 256, 6):
        shape = auto_mesh_shape(n, experts)
        fsdp, expert = shape.get("fsdp", 1), shape.get("expert", 1)
        assert fsdp * expert == n and experts % expert == 0 and set(shape) <= {"fsdp", "expert"}
        if n >= 4:
            assert fsdp >= 2
        # no larger expert axis would also divide both and leave fsdp >= 2
        better = [d for d in range(expert + 1, n + 1) if n % d == 0 and experts % d == 0 and (n < 4 or n // d >= 2)]
        assert not better, (n, experts, shape, better)


_WORKER = r"""
import json, os, sys
sys.path.insert(0, {root!r})
import jax
from configs.paper import get_config
from prefjax.pipeline import config_mesh
from prefjax.preflight import PreflightError
from prefjax.runconfig import RunConfig
out = {{"devices": len(jax.local_devices())}}
def mesh(arg, **axes):
    c = get_config(arg)
    c.tasks.source = "tasks.jsonl"
    for k, v in axes.items():
        setattr(c.mesh, k, v)
    try:
        m = config_mesh(RunConfig.from_config(c))
    except PreflightError as e:
        return "error: " + str(e)
    return None if m is None else dict(m.shape)
for arg in ("gemma3-27b", "gemma3-4b", "llama31-8b", "qwen35-122b-a10b"):
    out[arg] = mesh(arg)
out["named_fsdp4"] = mesh("gemma3-27b", fsdp=4)
out["named_fsdp2_expert4"] = mesh("qwen35-122b-a10b", fsdp=2, expert=4)
out["named_one"] = mesh("gemma3-27b", data=1, fsdp=1, tensor=1, expert=1)
print("RESULT " + json.dumps(out))
"""


def test_auto_mesh_on_8_fake_devices():
    """In a subprocess with 8 CPU devices: dense rows put every device on fsdp; the MoE row gets the
    (fsdp, expert) split that its hand-written mesh used to name, (1, 2, 1, 4); a named mesh of 4 is
    refused naming it and the device count; a named mesh of 8 and a product-1 mesh are accepted."""
    from prefjax.models.qwen35 import PRESETS
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _WORKER.format(root=ROOT)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    n = out["devices"]
    assert n == 8
    for arg in ("gemma3-27b", "gemma3-4b", "llama31-8b"):
        assert out[arg] == {"data": 1, "fsdp": n, "tensor": 1, "expert": 1}, (arg, out[arg])
    moe = out["qwen35-122b-a10b"]
    assert moe == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 4}, moe
    assert PRESETS["qwen35-122b-a10b"].n_experts % moe["expert"] == 0
    assert out["named_fsdp4"].startswith("error: ") and "{'fsdp': 4} of 4 devices" in out["named_fsdp4"] \
        and f"has {n} cpu device" in out["named_fsdp4"], out["named_fsdp4"]
    assert out["named_fsdp2_expert4"] == moe
    assert out["named_one"] is None
