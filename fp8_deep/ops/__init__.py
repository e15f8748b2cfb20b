"""Launchers: validate -> allocate (in the consumer's layout) -> launch. No autograd here."""
from .quant import (dequantize_blockwise, quantize_activation, quantize_weight_blockwise, to_tma_aligned_scales,
                    tma_aligned_scale_strides)
from .plan import RoutingPlan, max_padded_rows

__all__ = ["quantize_weight_blockwise", "quantize_activation", "to_tma_aligned_scales", "tma_aligned_scale_strides",
           "dequantize_blockwise", "RoutingPlan", "max_padded_rows"]
