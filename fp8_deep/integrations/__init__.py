"""Optional dependencies, one module each. Importing this registers lazy loaders (no optional import happens)."""
from . import deep_gemm, vllm

deep_gemm.register()
vllm.register()

__all__ = ["deep_gemm", "vllm"]
