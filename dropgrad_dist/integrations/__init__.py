"""Integrations with high-level trainers; each module imports its trainer library only when imported itself.

- :mod:`dropgrad_dist.integrations.dcp`: ``torch.distributed.checkpoint`` (``RegularizerState``).
- :mod:`dropgrad_dist.integrations.transformers`: Hugging Face ``Trainer`` (``add_regularizers``).
- :mod:`dropgrad_dist.integrations.lightning`: PyTorch Lightning (``DropGradDDPStrategy``).
"""
