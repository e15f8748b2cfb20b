"""Launchers: validate -> allocate (in the consumer's layout) -> launch. No autograd here.

Quantization (``quant``), the MoE's building blocks (``routing``, ``grouped_gemm``, ``swiglu``, ``combine``) and the
routing plan they share (``plan``). Optional backends (vLLM, DeepGEMM) plug in through ``_registry``.
"""
from .combine import moe_combine
from .decode import DecodeConfig, moe_decode_gemm1, moe_decode_gemm2, moe_routed_gemm1, moe_routed_gemm2
from .grouped_gemm import (GemmConfig, TritonGroupedGemm, gather_config, grouped_gemm_fp8, grouped_gemm_fp8_gather,
                           grouped_gemm_swiglu_fp8)
from .plan import RoutingPlan, max_padded_rows
from .layout import alloc_scales, scale_strides, tma_aligned_scale_strides
from .quant import (GroupedWeightQuant, align_quantize_permute, dequantize_blockwise, quantize_activation, quantize_permute,
                    quantize_weight_blockwise, quantize_weights_grouped, to_tma_aligned_scales)
from .routing import align_routing, check_topk_ids, permute_rows
from .swiglu import silu_mul_backward_quantize, silu_mul_quantize
from .transpose_quant import quantize_activation_t
from .wgrad import k_grouped_gemm_fp8

__all__ = ["quantize_weight_blockwise", "quantize_weights_grouped", "GroupedWeightQuant", "quantize_activation",
           "quantize_permute", "align_quantize_permute", "to_tma_aligned_scales", "tma_aligned_scale_strides",
           "alloc_scales", "scale_strides", "dequantize_blockwise", "RoutingPlan", "max_padded_rows", "align_routing", "check_topk_ids",
           "permute_rows", "grouped_gemm_fp8", "grouped_gemm_fp8_gather", "gather_config", "grouped_gemm_swiglu_fp8", "TritonGroupedGemm", "GemmConfig", "silu_mul_quantize",
           "moe_combine", "moe_decode_gemm1", "moe_decode_gemm2", "moe_routed_gemm1", "moe_routed_gemm2", "DecodeConfig", "silu_mul_backward_quantize", "quantize_activation_t", "k_grouped_gemm_fp8"]
