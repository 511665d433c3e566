"""Implementations of the fused updates, one module per backend (see ``ema_kernels._ops``)."""
