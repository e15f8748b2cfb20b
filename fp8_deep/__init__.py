"""fp8_deep: DeepSeek-V3's FP8 recipe (E4M3, 128x128 weight blocks, 1x128 activation groups) for MoE layers.

Public surface: ``moe_forward`` (inference and training), ``FP8MoE``, ``quantize_moe_weights`` / ``MoEWeightsFP8``
(a layer's FP8 weights, quantized once per optimizer step), ``ops`` (quantization and the MoE's building blocks).
"""
from . import integrations as _integrations  # registers the optional backends' lazy loaders; imports nothing optional
from . import ops
from .api import last_backend, moe_forward
from .export import (QuantizedStateDict, WeightSyncPlan, default_skip, fp8_expert_stacks, fp8_quantization_config,
                     is_quantized_name, load_fp8_checkpoint, quantize_state_dict, quantize_tp_shard,
                     save_fp8_checkpoint, scale_name)
from .moe import FP8MoE, MoEWeightsFP8, quantize_moe_weights

__version__ = "0.1.0"
__all__ = ["moe_forward", "FP8MoE", "MoEWeightsFP8", "quantize_moe_weights", "ops", "last_backend", "__version__",
           # weight sync / checkpoint export (fp8_deep.export)
           "quantize_state_dict", "QuantizedStateDict", "WeightSyncPlan", "default_skip", "is_quantized_name", "scale_name",
           "fp8_quantization_config", "quantize_tp_shard", "save_fp8_checkpoint", "load_fp8_checkpoint",
           "fp8_expert_stacks"]
