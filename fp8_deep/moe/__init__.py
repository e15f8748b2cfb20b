"""Composition of the ops into the MoE forward, and the nn.Module."""
from .forward import moe_forward_impl
from .module import FP8MoE

__all__ = ["moe_forward_impl", "FP8MoE"]
