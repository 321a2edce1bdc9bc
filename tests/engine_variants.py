"""Model variants the engine tests share (imported by test modules; tests/ is on sys.path under pytest)."""

import dataclasses

from prefjax.models.family import Family


def without_state_layout(model):
    """``model`` under a copy of its family that declares no decode-state layout: the engine refuses it
    (:func:`prefjax.engine.engine_refusal`) while ``generate`` runs it as before (no prefix caches)."""
    fam = model.family
    odd = Family(**{**{f.name: getattr(fam, f.name) for f in dataclasses.fields(Family)},
                    "name": f"{fam.name}-no-layout", "plain_kv_state": False, "state_layout": None})
    return dataclasses.replace(model, family=odd)


def qwen35_with_tokenizer_of(model):
    """A tiny random Qwen-3.5 (recurrent DeltaNet state) with ``model``'s vocabulary size and tokenizer, so
    text paths (elicitation, steering completions) can run it."""
    import jax
    import jax.numpy as jnp

    from prefjax.model import Model
    from prefjax.models import FAMILIES

    fam = FAMILIES["qwen35"]
    cfg = dataclasses.replace(fam.presets["qwen35-tiny"], vocab_size=model.config.vocab_size, name="qwen35-tiny-tok")
    params = jax.jit(lambda k: fam.init_params(cfg, k, jnp.float32))(jax.random.PRNGKey(0))
    return Model(fam, cfg, params, tokenizer=model.tokenizer, source="qwen35-tiny-tok")
