"""The main job: the whole pipeline on the real Gemma-3-270M (CPU, ~15 minutes on 2 cores).

    python launch/main.py --config configs/default.py --workdir runs/default
    python launch/main.py --config configs/default.py:tiny --workdir /tmp/t   # random tiny model (tests)

Variants (``:arg``): ``""`` (default) and ``tiny``. Any field can be overridden on the command line,
e.g. ``--config.tasks.n=40 --config.personas='("default","evil","novelist")'``; a misspelt field is an error.
"""

import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("tasks", "choices", "utilities", "activations", "probes", "transfer", "steering", "inlp", "report")
    c.model = ml_collections.ConfigDict({"source": "gemma3-270m", "dtype": "float32"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.tasks = ml_collections.ConfigDict({"source": "default", "n": 66, "seed": 0})
    c.personas = ("default", "evil")
    c.choices = ml_collections.ConfigDict({
        "mode": "logit",          # "logit": P(A) from the label token after the forced prefix; "sample": generate + parse
        "samples": 1, "orders": "both", "degree": 10, "active_rounds": 1, "pairs_per_round": 66,
        "batch_size": 16, "max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": 0,
    })
    c.activations = ml_collections.ConfigDict({"layers": "all", "n_after": 0, "batch_size": 16, "dtype": "float32"})
    c.probes = ml_collections.ConfigDict({"alphas": (1.0, 10.0, 100.0, 1e3, 1e4, 1e5), "position_index": 0,
                                          "n_perm": 100})
    c.steering = ml_collections.ConfigDict({"persona": "default", "layer": "best", "mode": "contrastive",
                                            "coefs": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0), "n_pairs": 16})
    c.inlp = ml_collections.ConfigDict({"n_iter": 5})
    c.progress = True
    if arg == "tiny":
        c.model.source = "gemma3-tiny-tok"
        c.tasks.n = 24
        c.choices.degree = 4
        c.choices.active_rounds = 0
        c.activations.layers = "all"
        c.probes.n_perm = 20
        c.steering.n_pairs = 4
        c.steering.coefs = (-1.0, 0.0, 1.0)
        c.inlp.n_iter = 2
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/default.py; known: '', 'tiny'")
    return c
