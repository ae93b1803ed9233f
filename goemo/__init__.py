"""goemo: fine-tune transformer encoders for multi-label emotion classification with Lightning."""

__version__ = "0.1.0"
