"""prefjax: measure, read and steer the preferences of large language models in JAX."""

from prefjax.api import load
from prefjax.hooks import FINAL_HOOK, CaptureSpec, HookError, hook_name
from prefjax.model import Model

__all__ = ["load", "Model", "CaptureSpec", "HookError", "hook_name", "FINAL_HOOK", "generate"]
__version__ = "0.1.0"


def generate(model, prompts, **kwargs):
    """Sample from ``model``; see :func:`prefjax.generation.generate`."""
    from prefjax.generation import generate as _generate
    return _generate(model, prompts, **kwargs)
