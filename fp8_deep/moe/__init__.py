"""Composition of the ops into the MoE forward, its autograd Function (training), and the nn.Module."""
from .autograd import MoEWeightsFP8, quantize_moe_weights
from .forward import moe_forward_impl
from .module import FP8MoE

__all__ = ["moe_forward_impl", "FP8MoE", "MoEWeightsFP8", "quantize_moe_weights"]
