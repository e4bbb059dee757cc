"""kdrun: config-driven knowledge-distillation experiments on PyTorch."""
__version__ = "0.1.0"
