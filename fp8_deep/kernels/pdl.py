"""Programmatic dependent launch (PDL, SM90+): the prologue every kernel of the MoE forward's chain runs first.

In a chain of dependent launches (quantize/permute -> align -> GEMM1 -> SwiGLU -> GEMM2 -> combine) a small call is
bound by the gaps between kernels, not by their work: each launch waits for its predecessor's grid to drain before
its own CTAs are scheduled. Launched with ``launch_pdl=True`` (CUDA's programmatic stream serialization; CUDA graphs
keep it as a programmatic edge), a kernel may be scheduled as soon as every CTA of its predecessor has executed
``griddepcontrol.launch_dependents``; ``griddepcontrol.wait`` then blocks until the predecessor grid has completed
and its memory is visible.

Correctness rests on one rule, kept by calling this first: a kernel launched with PDL touches no global memory
before its wait. Its wait returns only once the predecessor completed, and the predecessor (launched the same way)
waited for its own predecessor before doing anything, so every earlier kernel of the stream has completed too.
Both instructions are no-ops in a kernel launched without PDL (e.g. the first of the chain after a plain launch).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """Wait for the predecessor grid, then let the successor's CTAs be scheduled (it will wait for us in turn)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
