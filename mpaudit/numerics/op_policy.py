"""Autocast's op lists as plain data: which aten ops run in half precision, in fp32, or in their widest input type.

CUDA autocast and CPU autocast register different lists. Under ``torch.autocast("cuda")`` ``exp``, ``softmax``,
``log_softmax``, ``sum``, ``layer_norm``, ``pow`` and ``norm`` of a half tensor run in fp32; under
``torch.autocast("cpu")`` they run in half. A CPU audit that predicts GPU training therefore follows the CUDA
lists (:mod:`mpaudit.run.autocast_policy` registers the kernels that do so); the CPU lists are kept too, for
``--autocast-policy cpu`` and for the ops where the two policies differ.

The tables are pinned to PyTorch :data:`PINNED_TORCH`:

* CUDA: the macros of ``aten/src/ATen/autocast_mode.h`` (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
  ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``) and the
  ``Autocast`` block of ``aten/src/ATen/autocast_mode.cpp`` (the cuDNN convolutions, the banned
  ``binary_cross_entropy``).
* CPU: the ``AutocastCPU`` block of ``aten/src/ATen/autocast_mode.cpp``.

A test checks them against the installed torch: every op with an ``AutocastCUDA`` (``AutocastCPU``) kernel is in
exactly one CUDA (CPU) table or in :data:`NOT_APPLICABLE`, and on fake CUDA tensors the real CUDA kernels pick the
dtypes the emulation picks.

Op names are spelled as ``torch._C._dispatch_get_all_op_names()`` spells them, without the ``aten::`` namespace:
``name`` for the default overload, ``name.overload`` for the others.

Plain data only: no torch import (the readers of results use this module too).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

PINNED_TORCH: Final = "2.13"
"""The PyTorch version (major.minor) whose autocast sources these tables copy."""

CastPolicy = Literal["lower_precision_fp", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned"]
"""What autocast does to an op (``at::autocast::CastPolicy``, plus the banned ops):

* ``lower_precision_fp``: cast every floating input to the autocast dtype (fp16 or bf16);
* ``fp32``: cast every floating input to fp32, so the op runs and returns fp32;
* ``fp32_set_opt_dtype``: when the first input is floating, pass ``dtype=torch.float32`` unless a dtype is given
  (``softmax``, ``sum``, ...): the op computes and returns fp32 without casting its inputs first;
* ``fp32_append_dtype``: call the overload that takes a dtype, with fp32 (``norm``);
* ``promote``: cast every floating input to the widest floating type among them (fp32 over half);
* ``banned``: raise (CUDA refuses ``binary_cross_entropy``, which is unsafe in half precision).
"""
CAST_POLICIES: Final[tuple[CastPolicy, ...]] = get_args(CastPolicy)

# ------------------------------------------------------------------------------------------------ CUDA

CUDA_LOWER_PRECISION_FP: Final[tuple[str, ...]] = (
    "_convolution.deprecated",
    "_convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "einsum",
    "mm",
    "mv",
    "linalg_vecdot",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
    "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
    # registered beside the macro in autocast_mode.cpp
    "cudnn_convolution",
    "cudnn_convolution_transpose",
)
"""CUDA autocast's ``lower_precision_fp`` list: matmuls, convolutions, RNN cells and attention run in fp16/bf16."""

CUDA_FP32: Final[tuple[str, ...]] = (
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "group_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
"""CUDA autocast's ``fp32`` list: transcendental functions, norms, losses and upsampling run in fp32."""

CUDA_FP32_SET_OPT_DTYPE: Final[tuple[str, ...]] = (
    "prod",
    "prod.dim_int",
    "softmax.int",
    "log_softmax.int",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
)
"""CUDA autocast's ``fp32_set_opt_dtype`` list: reductions and softmax compute in fp32 unless given a dtype."""

CUDA_FP32_APPEND_DTYPE: Final[dict[str, str]] = {
    "norm.Scalar": "norm.ScalarOpt_dtype",
    "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
}
"""CUDA autocast's ``fp32_append_dtype`` ops, each with the overload it calls instead, with ``dtype`` appended
(``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``)."""

CUDA_PROMOTE: Final[tuple[str, ...]] = (
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "grid_sampler",
    "index_put",
    "tensordot",
    "scatter_add",
)
"""CUDA autocast's ``promote`` list: ops with several floating inputs run in the widest of their types."""

CUDA_BANNED: Final[dict[str, str]] = {
    "binary_cross_entropy": (
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
        "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
        "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
        "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
        "safe to autocast."
    ),
}
"""Ops CUDA autocast refuses, with the error it raises (the same text, so a CPU audit fails as the GPU run would)."""

# ------------------------------------------------------------------------------------------------ CPU

CPU_LOWER_PRECISION_FP: Final[tuple[str, ...]] = (
    "conv1d",
    "conv1d.padding",
    "conv2d",
    "conv2d.padding",
    "conv3d",
    "conv3d.padding",
    "bmm",
    "mm",
    "linalg_vecdot",
    "baddbmm",
    "addmm",
    "addbmm",
    "linear",
    "_convolution.deprecated",
    "matmul",
    "conv_tbc",
    "mkldnn_rnn_layer",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "prelu",
    "scaled_dot_product_attention",
    "_native_multi_head_attention",
    "_addmm_activation",
)
"""CPU autocast's ``lower_precision_fp`` list."""

CPU_FP32: Final[tuple[str, ...]] = (
    "avg_pool3d",
    "binary_cross_entropy",
    "grid_sampler",
    "polar",
    "prod",
    "prod.dim_int",
    "quantile",
    "quantile.scalar",
    "nanquantile",
    "nanquantile.scalar",
    "stft",
    "stft.center",
    "cdist",
    "grid_sampler_2d",
    "_grid_sampler_2d_cpu_fallback",
    "grid_sampler_3d",
    "trace",
    "view_as_complex",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "inverse",
    "lu_solve",
    "orgqr",
    "ormqr",
    "pinverse",
    "max_pool3d",
    "max_unpool2d",
    "max_unpool3d",
    "adaptive_avg_pool3d",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "mse_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "cross_entropy_loss",
    "l1_loss",
    "huber_loss",
    "margin_ranking_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "ctc_loss.IntList",
    "ctc_loss.Tensor",
    "kl_div",
    "multilabel_margin_loss",
    "binary_cross_entropy_with_logits",
    "fft_fft",
    "fft_ifft",
    "fft_fft2",
    "fft_ifft2",
    "fft_fftn",
    "fft_ifftn",
    "fft_rfft",
    "fft_irfft",
    "fft_rfft2",
    "fft_irfft2",
    "fft_rfftn",
    "fft_irfftn",
    "fft_hfft",
    "fft_ihfft",
    "linalg_cond",
    "linalg_cond.p_str",
    "linalg_matrix_rank",
    "linalg_matrix_rank.tol_tensor",
    "linalg_matrix_rank.atol_rtol_tensor",
    "linalg_matrix_rank.atol_rtol_float",
    "linalg_solve",
    "linalg_cholesky",
    "linalg_svdvals",
    "linalg_eigvals",
    "linalg_eigvalsh",
    "linalg_inv",
    "linalg_householder_product",
    "linalg_tensorinv",
    "linalg_tensorsolve",
    "fake_quantize_per_tensor_affine",
    "geqrf",
    "_lu_with_info",
    "qr",
    "svd",
    "triangular_solve",
    "fractional_max_pool2d",
    "fractional_max_pool3d",
    "adaptive_max_pool3d",
    "multilabel_margin_loss_forward",
    "linalg_qr",
    "linalg_cholesky_ex",
    "linalg_svd",
    "linalg_eig",
    "linalg_eigh",
    "linalg_lstsq",
    "linalg_inv_ex",
)
"""CPU autocast's ``fp32`` list (note what it lacks: ``exp``, ``softmax``, ``sum``, ``layer_norm``, ``pow``...)."""

CPU_PROMOTE: Final[tuple[str, ...]] = ("stack", "cat", "index_copy")
"""CPU autocast's ``promote`` list."""

# ------------------------------------------------------------------------------------------------ the gaps

CPU_KERNELS_KEPT: Final[dict[str, str]] = {
    "mkldnn_rnn_layer": (
        "the CPU counterpart of _cudnn_rnn, which CUDA builds with cuDNN run in lower precision "
        "(aten/src/ATen/native/cudnn/AutocastRNN.cpp): CPU autocast's lower-precision kernel already does that"
    ),
}
"""CPU-only ops whose CPU autocast kernel stays under the CUDA policy, with the reason. Every other op that only
CPU autocast lists runs as CUDA autocast runs it: untouched, in its inputs' dtype."""

NOT_APPLICABLE: Final[dict[str, str]] = {
    "_cudnn_rnn": (
        "registered for AutocastCUDA only by CUDA builds with cuDNN (lower precision); a CPU never calls it: "
        "nn.LSTM/GRU/RNN reach mkldnn_rnn_layer there (see CPU_KERNELS_KEPT)"
    ),
}
"""Ops a CUDA build of torch registers for CUDA autocast that no table needs (a CPU build does not register
them), with the reason."""

CUDA_ONLY_OPS: Final[frozenset[str]] = frozenset({
    "cudnn_convolution",
    "cudnn_convolution_transpose",
    "_scaled_dot_product_flash_attention",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
})
"""Ops of the CUDA tables that have no CPU kernel: a CPU model never reaches them (its convolutions, attention and
RNN cells dispatch to CPU ops), so the emulation registers them only for completeness."""


def _by_op(tables: dict[CastPolicy, tuple[str, ...]]) -> dict[str, CastPolicy]:
    policies: dict[str, CastPolicy] = {}
    for policy, ops in tables.items():
        for op in ops:
            if op in policies:
                raise ValueError(f"{op} is in both the {policies[op]} and the {policy} table")
            policies[op] = policy
    return policies


CUDA_POLICY: Final[dict[str, CastPolicy]] = _by_op({
    "lower_precision_fp": CUDA_LOWER_PRECISION_FP,
    "fp32": CUDA_FP32,
    "fp32_set_opt_dtype": CUDA_FP32_SET_OPT_DTYPE,
    "fp32_append_dtype": tuple(CUDA_FP32_APPEND_DTYPE),
    "promote": CUDA_PROMOTE,
    "banned": tuple(CUDA_BANNED),
})
"""Every op CUDA autocast handles, and how."""

CPU_POLICY: Final[dict[str, CastPolicy]] = _by_op({
    "lower_precision_fp": CPU_LOWER_PRECISION_FP,
    "fp32": CPU_FP32,
    "promote": CPU_PROMOTE,
})
"""Every op CPU autocast handles, and how."""


def differing_ops() -> dict[str, tuple[CastPolicy | None, CastPolicy | None]]:
    """The ops whose treatment differs between the policies: ``{op: (cuda policy, cpu policy)}``, None where a
    policy leaves the op alone. Ops in :data:`CPU_KERNELS_KEPT` are left out (both policies run CPU's kernel)."""
    ops = (set(CUDA_POLICY) | set(CPU_POLICY)) - set(CPU_KERNELS_KEPT)
    pairs = {op: (CUDA_POLICY.get(op), CPU_POLICY.get(op)) for op in sorted(ops)}
    return {op: pair for op, pair in pairs.items() if pair[0] != pair[1]}


__all__ = [
    "CAST_POLICIES",
    "CPU_FP32",
    "CPU_KERNELS_KEPT",
    "CPU_LOWER_PRECISION_FP",
    "CPU_POLICY",
    "CPU_PROMOTE",
    "CUDA_BANNED",
    "CUDA_FP32",
    "CUDA_FP32_APPEND_DTYPE",
    "CUDA_FP32_SET_OPT_DTYPE",
    "CUDA_LOWER_PRECISION_FP",
    "CUDA_ONLY_OPS",
    "CUDA_POLICY",
    "CUDA_PROMOTE",
    "NOT_APPLICABLE",
    "PINNED_TORCH",
    "CastPolicy",
    "differing_ops",
]
