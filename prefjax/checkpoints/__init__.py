"""Checkpoint readers: Hugging Face safetensors, GGUF (``prefjax.checkpoints.gguf``), adapters.

Each reader yields Hugging Face-named numpy tensors plus an HF-style config dict; import from the
submodules.
"""
