"""megatron-fp8flow: FP8-Flow MoE training for Megatron-Core.

The FP8 core (:mod:`megatron_fp8flow.fp8`) needs only torch and triton; Megatron-Core is
imported only by the Megatron adapters.
"""

from . import fp8

__version__ = "0.1.0"

__all__ = ["fp8", "__version__"]
