"""fp8_deep: DeepSeek-V3's FP8 recipe (E4M3, 128x128 weight blocks, 1x128 activation groups) for MoE layers."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
