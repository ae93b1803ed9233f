"""goemo: fine-tune transformer encoders for multi-label emotion classification with Lightning."""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    # `from goemo import load` imports torch, Lightning and transformers only when it is asked for.
    if name == "load":
        from goemo.api import load

        return load
    raise AttributeError(f"module 'goemo' has no attribute {name!r}")
