"""finetune: fine-tune Stable Diffusion-style models with one loop and interchangeable strategies."""
__version__ = "0.1.0"


def load_adapter(pipe, path, scale: float = 1.0, name: str | None = None) -> str:
    """Load a finetune artifact (LoRA, embedding, hypernetwork; A1111 files too) into a diffusers pipeline at strength `scale`."""
    from finetune.adapters import load_adapter as _load

    return _load(pipe, path, scale=scale, name=name)


def unload_adapter(pipe, name: str | None = None) -> list[str]:
    """Remove an adapter `load_adapter` loaded (by its returned name; None: every hypernetwork)."""
    from finetune.adapters import unload_adapter as _unload

    return _unload(pipe, name)


__all__ = ["__version__", "load_adapter", "unload_adapter"]
