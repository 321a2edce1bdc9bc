"""The steering sweep's greedy completions through the continuous-batching engine: the same token ids
and texts as the generate path, in both steering modes, on a model with prefix caches (the batched
branch: Gemma-3) and on Qwen-3.5 (recurrent state, no prefix cache: the per-coefficient branch), with
the forced-prefix logits unchanged; a model the engine refuses (a family without a
decode-state layout) falls back with a log line."""


import numpy as np
import pytest

import prefjax
from prefjax.elicit.personas import get_persona
from prefjax.experiments.steering import steering_sweep
from prefjax.steering import random_direction
from prefjax.tasks import load_default_pool

from engine_variants import qwen35_with_tokenizer_of, without_state_layout

COEFS = [-1.0, 0.0, 1.0]  # a sign flip and 0 (every direction's c = 0 cell is one computation)
SCALE = 10.0              # large enough that the tiny models' completions change with the coefficient
N_NEW = 6


@pytest.fixture(scope="module")
def gemma():
    return prefjax.load("gemma3-tiny-tok", dtype="float32")


@pytest.fixture(scope="module")
def qwen(gemma):
    return qwen35_with_tokenizer_of(gemma)


@pytest.fixture(scope="module")
def setup():
    pool = load_default_pool().subset(4, seed=0)
    pairs = [(pool[0], pool[1]), (pool[2], pool[3])]
    return pairs, get_persona("default")


def sweep(model, setup, mode, d_model, **kw):
    pairs, persona = setup
    dirs = {"probe": random_direction(d_model, 1), "random": random_direction(d_model, 2)}
    return steering_sweep(model, pairs, persona, mode, 0, SCALE, COEFS, dirs, N_NEW, **kw)


def assert_same_sweep(new, old):
    assert new["toward"] == old["toward"] and new["prompts"] == old["prompts"]
    for name in old["logits"]:
        for ci in range(len(COEFS)):
            np.testing.assert_array_equal(new["logits"][name][ci], old["logits"][name][ci])  # untouched
            assert [list(t) for t in new["tokens"][name][ci]] == [list(t) for t in old["tokens"][name][ci]], (name, ci)
            assert list(new["texts"][name][ci]) == list(old["texts"][name][ci]), (name, ci)
    zero = old["tokens"]["probe"][COEFS.index(0.0)]
    for c in (-1.0, 1.0):  # the steering changed completions, so the comparison means something
        assert old["tokens"]["probe"][COEFS.index(c)] != zero


@pytest.mark.parametrize("which,mode", [("gemma", "contrastive"), ("gemma", "single"),
                                        ("qwen", "contrastive"), ("qwen", "single")])
def test_engine_completions_equal_generate_path(which, mode, setup, capfd, request):
    model = request.getfixturevalue(which)
    assert model.prefix_ok() == (which == "gemma")  # Gemma: the batched branch; Qwen-3.5: per coefficient
    old = sweep(model, setup, mode, model.d_model, engine=False)
    capfd.readouterr()
    new = sweep(model, setup, mode, model.d_model)
    err = capfd.readouterr().err
    # contrastive: 4 prompts (2 pairs x 2 showings), towards B at c = towards A at -c, c = 0 shared by
    # both directions and both showings: 2 directions x 4 + 2 cells; single: 2 x 8 + 2
    n_cells = 10 if mode == "contrastive" else 18
    assert f"steering: engine: {n_cells} completions" in err and "instead" not in err
    assert_same_sweep(new, old)


def test_refused_model_falls_back_with_a_log_line(setup, capfd):
    m = without_state_layout(prefjax.load("gemma3-tiny-tok", dtype="float32"))
    old = sweep(m, setup, "contrastive", m.d_model, engine=False)
    capfd.readouterr()
    new = sweep(m, setup, "contrastive", m.d_model)
    err = capfd.readouterr().err
    assert "the engine does not serve this model" in err and "declares no decode-state layout" in err
    assert "completions with generate instead" in err
    assert_same_sweep(new, old)
