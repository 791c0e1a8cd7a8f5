"""sae-kernels ops: fused sparse encoders, sparse decode and their sparse, deterministic backward passes.

Set TRITON_INTERPRET=1 before importing this package to run the Triton kernels on CPU tensors.
"""

from . import reference
from .backend import get_backend, set_backend, set_validation, use_backend, validation_enabled
from .batch_topk import batch_topk_encode, batch_topk_inference
from .code import SparseCode
from .prefix import prefix_errors, prefix_losses
from .sparse_decode import sparse_decode
from .threshold_encode import GatedCode, JumpReLUCode, gated_encode, jumprelu_encode, relu_encode
from .topk_encode import topk_encode
from .torch_ops import topk_select as chunked_topk_select

__all__ = [
    "GatedCode",
    "JumpReLUCode",
    "SparseCode",
    "batch_topk_encode",
    "batch_topk_inference",
    "chunked_topk_select",
    "gated_encode",
    "get_backend",
    "jumprelu_encode",
    "prefix_errors",
    "prefix_losses",
    "reference",
    "relu_encode",
    "set_backend",
    "set_validation",
    "sparse_decode",
    "topk_encode",
    "use_backend",
    "validation_enabled",
]
