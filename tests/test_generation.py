"""KV-cache generation vs recomputing the whole sequence; sampling streams; input errors."""

import numpy as np
import pytest

import prefjax
from prefjax.generation import GenerationError, generate, sample_tokens

N_NEW = 8


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny")


def prompts_of(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, 512, size=n)] for n in lengths]


def recompute_greedy(model, prompts, n_new):
    """Greedy continuation by re-running the full left-padded batch at every step (no cache)."""
    seqs = [list(p) for p in prompts]
    t = max(len(s) for s in seqs) + n_new  # one width for every step: one compile
    for _ in range(n_new):
        toks = np.zeros((len(seqs), t), np.int32)
        valid = np.zeros((len(seqs), t), bool)
        for b, s in enumerate(seqs):
            toks[b, t - len(s):] = s
            valid[b, t - len(s):] = True
        logits, _ = model.run(toks, attention_mask=valid)
        nxt = np.argmax(np.asarray(logits)[:, -1], axis=-1)
        for b in range(len(seqs)):
            seqs[b].append(int(nxt[b]))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("loop", ["while", "python"])
def test_greedy_cache_equals_recompute(model, loop):
    # lengths straddle the sliding window (8) of the tiny model and force left padding
    prompts = prompts_of([3, 11, 20])
    g = generate(model, prompts, max_new_tokens=N_NEW, temperature=0, stop_ids=(), loop=loop)
    ref = recompute_greedy(model, prompts, N_NEW)
    assert g.token_ids == ref
    assert g.prompt_lens == [3, 11, 20]
    assert g.finished == [False] * 3
    assert g.texts is None


def test_greedy_while_equals_python_and_chunking(model):
    prompts = prompts_of([4, 9, 17, 2, 12], seed=1)
    a = generate(model, prompts, max_new_tokens=6, temperature=0, stop_ids=())
    b = generate(model, prompts, max_new_tokens=6, temperature=0, stop_ids=(), batch_size=2, loop="python")
    assert a.token_ids == b.token_ids


def test_sampling_independent_of_batch_composition(model):
    prompts = prompts_of([5, 14, 9, 21], seed=2)
    full = generate(model, prompts, max_new_tokens=N_NEW, temperature=1.0, seed=7, stop_ids=())
    # same examples, other order and other batch-mates, ids carried along
    order = [3, 1]
    part = generate(model, [prompts[i] for i in order], max_new_tokens=N_NEW, temperature=1.0, seed=7,
                    stop_ids=(), example_ids=order)
    assert [full.token_ids[i] for i in order] == part.token_ids
    single = generate(model, [prompts[2]], max_new_tokens=N_NEW, temperature=1.0, seed=7, stop_ids=(),
                      example_ids=[2])
    assert single.token_ids[0] == full.token_ids[2]
    # another seed or another example id gives another stream
    other = generate(model, prompts, max_new_tokens=N_NEW, temperature=1.0, seed=8, stop_ids=())
    assert other.token_ids != full.token_ids
    shifted = generate(model, [prompts[2]], max_new_tokens=N_NEW, temperature=1.0, seed=7, stop_ids=(),
                       example_ids=[3])
    assert shifted.token_ids[0] != full.token_ids[2]


def test_top_k_one_is_greedy(model):
    prompts = prompts_of([6, 13], seed=3)
    greedy = generate(model, prompts, max_new_tokens=N_NEW, temperature=0, stop_ids=())
    k1 = generate(model, prompts, max_new_tokens=N_NEW, temperature=1.3, top_k=1, seed=5, stop_ids=())
    tiny_p = generate(model, prompts, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6, seed=5, stop_ids=())
    assert k1.token_ids == greedy.token_ids
    assert tiny_p.token_ids == greedy.token_ids


def test_sampler_filters():
    import jax
    import jax.numpy as jnp
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(0), jnp.arange(4000))
    top2 = np.asarray(sample_tokens(logits, keys, 0, 1.0, 1.0, greedy=False, top_k=2, use_top_p=False))
    assert set(top2.tolist()) == {0, 1}
    assert abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03
    # nucleus 0.7: tokens 0 (0.5) and 1 (mass before = 0.5 < 0.7) are kept, token 2 (0.8) is not
    nuc = np.asarray(sample_tokens(logits, keys, 0, 1.0, 0.7, greedy=False, top_k=0, use_top_p=True))
    assert set(nuc.tolist()) == {0, 1}
    full = np.asarray(sample_tokens(logits, keys, 0, 1.0, 1.0, greedy=False, top_k=0, use_top_p=False))
    assert set(full.tolist()) == {0, 1, 2, 3}


def test_stop_ids_and_finished(model):
    prompts = prompts_of([7, 10], seed=4)
    free = generate(model, prompts, max_new_tokens=N_NEW, temperature=0, stop_ids=())
    stop = free.token_ids[0][3]
    g = generate(model, prompts, max_new_tokens=N_NEW, temperature=0, stop_ids=[stop])
    first = free.token_ids[0].index(stop)
    assert g.token_ids[0] == free.token_ids[0][:first]  # stop token excluded
    assert g.finished[0] is True
    if stop in free.token_ids[1]:
        assert g.token_ids[1] == free.token_ids[1][:free.token_ids[1].index(stop)]
    else:
        assert g.token_ids[1] == free.token_ids[1] and g.finished[1] is False


def test_capture_in_generation(model):
    prompts = prompts_of([9, 4], seed=5)
    name = "blocks.3.hook_resid_post"
    g = generate(model, prompts, max_new_tokens=4, temperature=0, stop_ids=(), capture=(name,))
    cap = g.captured[name]
    assert cap.shape == (2, 4, model.d_model)
    # entry 0 = last prompt token, entry 1 = first generated token
    for b, p in enumerate(prompts):
        seq = np.array([p + g.token_ids[b]], np.int32)
        _, ref = model.run(seq, capture=(name,))
        ref = np.asarray(ref[name])[0]
        np.testing.assert_allclose(cap[b, 0], ref[len(p) - 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cap[b, 3], ref[len(p) + 2], rtol=1e-5, atol=1e-5)


def test_bad_input(model):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[5, 6], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="context of 1024"):
        generate(model, [[5] * 1000], max_new_tokens=30)
    with pytest.raises(GenerationError, match="no tokenizer"):
        generate(model, ["hello"], max_new_tokens=4)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[5, 600]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(model, [[5, 6]], max_new_tokens=0)
    with pytest.raises(GenerationError, match="list of prompts"):
        generate(model, [5, 6], max_new_tokens=3)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [[5, 6]], max_new_tokens=3, top_p=0.0)


# ---------------------------------------------------------------------------------------------
# Prefix caches (Model.prefill / run(prefix=...) / generate(share_prefix=..., prefix=...))

def test_prefix_cache_run_equals_full_run(model):
    names = ["blocks.1.hook_resid_post"]
    start = prompts_of([20], seed=5)[0]
    tails = prompts_of([3, 9, 5], seed=6)
    seqs = [start + t for t in tails]
    from prefjax.model import common_prefix_len
    assert common_prefix_len(seqs) == 20 and common_prefix_len(seqs, limit=7) == 0  # below min_len
    ref = [model.run(np.asarray([s]), capture=names, positions=np.asarray([[len(s) - 1]])) for s in seqs]
    # one shared start (20 tokens, past the sliding window of 8), right-padded continuations
    cache = model.prefill(np.asarray([start]))
    assert (cache.batch, cache.length, cache.contiguous) == (1, 20, True)
    w = 9
    toks, valid = np.zeros((3, w), np.int32), np.zeros((3, w), bool)
    for b, t in enumerate(tails):
        toks[b, :len(t)], valid[b, :len(t)] = t, True
    lg, cap = model.run(toks, attention_mask=valid, capture=names, positions=np.asarray([[len(t) - 1] for t in tails]),
                        prefix=cache)
    for b, (rl, rc) in enumerate(ref):
        np.testing.assert_allclose(np.asarray(lg)[b], np.asarray(rl)[0], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(cap[names[0]])[b], np.asarray(rc[names[0]])[0], atol=2e-5, rtol=1e-5)
    # a left-padded continuation leaves padding inside the window: refused past it
    with pytest.raises(ValueError, match="sliding window"):
        model.run(toks[:, ::-1].copy(), attention_mask=valid[:, ::-1].copy(), prefix=cache)
    # one cache row per prompt (all but the last token; left-padded), picked by prefix_rows
    rows = model.prefill_rows([s[:-1] for s in seqs])
    assert rows.batch == 3 and rows.contiguous  # the window leaves the shared start unshared
    lg2, _ = model.run(np.asarray([[seqs[2][-1]], [seqs[0][-1]]]), prefix=rows, prefix_rows=[2, 0])
    np.testing.assert_allclose(np.asarray(lg2)[:, 0], np.asarray([ref[2][0][0, 0], ref[0][0][0, 0]]), atol=2e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="prefix_rows"):
        model.run(np.asarray([[1], [2]]), prefix=rows)


def test_generate_with_prefix_cache(model, monkeypatch):
    start = prompts_of([12], seed=8)[0]
    same = [start + t for t in prompts_of([8, 8, 8], seed=9)]  # one length (pad_multiple): no padding after the prefix
    ref = recompute_greedy(model, same, 5)
    calls = []
    prefill = type(model).prefill
    monkeypatch.setattr(type(model), "prefill",
                        lambda self, ids, **kw: calls.append(np.shape(ids)) or prefill(self, ids, **kw))
    assert generate(model, same, max_new_tokens=5, temperature=0, stop_ids=(), share_prefix=True).token_ids == ref
    assert calls == [(1, 12)]  # the shared start ran once, as a prefix cache
    monkeypatch.undo()
    mixed = [start + t for t in prompts_of([2, 6], seed=10)]  # padding after the prefix: past the window, unshared
    assert (generate(model, mixed, max_new_tokens=5, temperature=0, stop_ids=(), share_prefix=True).token_ids
            == recompute_greedy(model, mixed, 5))
    # decode from a cache of the prompts but their last token
    cache = model.prefill_rows([s[:-1] for s in same])
    g = generate(model, [[s[-1]] for s in same], max_new_tokens=5, temperature=0, stop_ids=(), prefix=cache,
                 pad_multiple=1)
    assert g.token_ids == ref
    with pytest.raises(GenerationError, match="not both"):
        generate(model, same, max_new_tokens=2, prefix=cache, share_prefix=True)
