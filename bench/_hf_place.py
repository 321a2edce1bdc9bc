"""The transformers side of the benchmarks, shared by bench_qwen35.py and bench_workload.py: a model with
random weights placed as ``device_map="auto"`` would place a checkpoint (:func:`hf_spread`), and a sampled
cached decode loop timed per step (:func:`hf_decode_seconds`)."""

from __future__ import annotations

import inspect
import time


def sync_all() -> None:
    """Wait for every GPU (a spread model runs on several in turn); nothing on the CPU."""
    import torch
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def hf_spread(cls, config, dtype, scale: float = 0.02, frac: float = 0.85):
    """A transformers model with random weights spread over every GPU (or the CPU), as
    ``device_map="auto"`` would place a checkpoint: built on the meta device, each parameter drawn on
    its own device (normal * ``scale``), then dispatched (accelerate moves activations between devices).
    ``frac``: the share of each GPU's free memory the placement may fill with weights (the rest is for
    activations and the cache). Returns ``(model, input device, {device: weight GiB})``.

    With GPUs present a map that puts any module on the CPU or disk (the weights do not fit in ``frac``)
    is refused: an offloaded model would time the host link, not the GPUs."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    with init_empty_weights():
        model = cls(config).to(dtype).eval()
    n = torch.cuda.device_count()
    if n:
        free = {i: int(torch.cuda.mem_get_info(i)[0] * frac) for i in range(n)}
    else:
        free = {"cpu": 1 << 40}
    device_map = infer_auto_device_map(model, max_memory=free, no_split_module_classes=model._no_split_modules,
                                       dtype=dtype)
    if n and any(d in ("cpu", "disk") for d in device_map.values()):
        off = sorted(k for k, d in device_map.items() if d in ("cpu", "disk"))
        raise RuntimeError(f"device_map puts {len(off)} modules off the GPUs (first: {off[:3]}) with {frac:.2f} of "
                           f"free memory per GPU {[round(v / 2**30, 1) for v in free.values()]} GiB")

    def where(name):
        while name not in device_map:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return device_map[name]

    gib: dict[str, float] = {}
    for name, p in model.named_parameters():
        dev = where(name)
        dev = f"cuda:{dev}" if isinstance(dev, int) else dev
        value = torch.randn(p.shape, dtype=dtype, device=dev) * scale
        set_module_tensor_to_device(model, name, dev, value=value)
        gib[dev] = gib.get(dev, 0.0) + p.numel() * value.element_size() / 2**30
    model = dispatch_model(model, device_map=device_map)
    first = where("model.embed_tokens.weight")
    return model, (f"cuda:{first}" if isinstance(first, int) else str(first)), {k: round(v, 2) for k, v in gib.items()}


def cache_kwarg(model) -> str:
    """The forward's cache argument: transformers renamed ``past_key_values`` to ``cache`` after 5.17."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_decode_seconds(model, ids, new: int, temperature: float = 0.7) -> float:
    """Seconds for ``new`` sampled decode steps after an untimed cached prefill of ``ids`` [B, T]: each step
    is one forward of the last sampled token with the model's cache, then a multinomial draw at
    ``temperature`` (the work of prefjax's jitted step)."""
    import torch
    kw = cache_kwarg(model)
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, lg = getattr(out, kw), out.logits[:, -1]
        sync_all()
        t0 = time.perf_counter()
        for _ in range(new):
            probs = torch.softmax(lg.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1)
            out = model(nxt, use_cache=True, **{kw: cache})
            cache, lg = getattr(out, kw), out.logits[:, -1]
        sync_all()
        return time.perf_counter() - t0
