"""memdistill: generative dataset distillation with a DiT and self-adaptive memory."""

__version__ = "0.1.0"
