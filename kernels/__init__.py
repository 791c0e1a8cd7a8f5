"""sae-kernels ops: fused sparse encoders, sparse decode and their sparse, deterministic backward passes.

Set TRITON_INTERPRET=1 before importing this package to run the Triton kernels on CPU tensors.

Every public op checks its arguments and calls a `torch.library` custom op on tensors, `<op>` (topk_select,
relu_select, jumprelu_select, gated_select, gather_matmul, gather_dot, scatter_rows, prefix_norms and
prefix_norms_backward), with its fake and autograd; `<op>` runs `<op>_triton` (the launcher beside its
kernel), `<op>_cpp` (beside it: the C++ CPU kernel of csrc/, torch.ops.sae_kernels_cpp, built into kernels._C;
encode.cpp for topk/threshold select, sparse.cpp for gather, scatter and prefix) or `<op>_torch` (torch_ops.py:
memory-bounded PyTorch) as backend.py decides. reference.py is the
float64 test oracle. Each op file reads top-down: kernel -> launcher -> custom op and autograd -> public op.

public op             op file -> kernel file           torch twin (torch_ops.py)  reference      test file
--------------------  -------------------------------  -------------------------  -------------  ---------------------
topk_encode           topk_encode.py                   topk_select_torch          topk_encode    test_topk_encode.py
batch_topk_encode     batch_topk.py -> topk_encode.py  topk_select_torch          batch_topk     test_batch_topk.py
batch_topk_inference  batch_topk.py -> threshold.py    threshold_select_torch     jumprelu       test_batch_topk.py
relu_encode           relu.py -> threshold.py          threshold_select_torch     relu           test_relu.py
jumprelu_encode       jumprelu.py -> threshold.py      threshold_select_torch     jumprelu       test_jumprelu.py
gated_encode          gated.py -> threshold.py         threshold_select_torch     gated          test_gated.py
sparse_decode         sparse_decode.py                 gather_matmul_torch        sparse_decode  test_sparse_decode.py
  (value gradient)    sparse_decode.py                 gather_dot_torch           gather_dot     test_scatter.py
  (weight gradients)  scatter.py                       scatter_rows_torch         scatter_rows   test_scatter.py
prefix_errors         prefix.py                        prefix_norms_torch         prefix_errors  test_prefix.py
prefix_losses         prefix.py                        prefix_norms_torch         prefix_losses  test_prefix.py
chunked_topk_select   torch_ops.py (no kernel)         topk_select_torch          topk_encode    test_topk_encode.py

Shared pieces: code.py (SparseCode, JumpReLUCode, GatedCode: every encoder returns a SparseCode); hints.py
(EncodeHints: speed hints a model owns); gemm.py (the x W^T tile and the grid split of the fused encoders);
threshold.py (the threshold kernel and launcher, threshold_select with capacity growth, the autograd pieces
of the three threshold ops; tests in test_threshold.py); validate.py (argument checks); tuning.py and
configs/ (launch configs as data); backend.py (which implementation runs).
"""

from . import _clash as _clash  # first: an ImportError beside Hugging Face's `kernels` distribution (see _clash.py)
from . import reference
from .backend import get_backend, set_backend, set_validation, use_backend, validation_enabled
from .batch_topk import batch_topk_encode, batch_topk_inference
from .code import GatedCode, JumpReLUCode, SparseCode
from .gated import gated_encode
from .hints import EncodeHints
from .jumprelu import jumprelu_encode
from .prefix import prefix_errors, prefix_losses
from .relu import relu_encode
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode
from .torch_ops import topk_select_torch as chunked_topk_select

__all__ = [
    "EncodeHints",
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
