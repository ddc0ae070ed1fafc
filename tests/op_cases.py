"""One call of each autocast-listed op with small inputs, shared by the op-policy and fp16-emulation tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

A = torch.ops.aten


@dataclass(frozen=True)
class Make:
    """Builds a case's arguments: floating tensors in ``dtype`` (``other`` for a promote op's second input),
    on ``device``; ``fake`` makes them under ``FakeTensorMode`` (no values)."""

    dtype: torch.dtype
    other_dtype: torch.dtype | None = None
    device: str = "cpu"
    fake: bool = False
    seed: int = 0

    def _make(self, shape: tuple[int, ...], low: float, high: float, dtype: torch.dtype | None) -> torch.Tensor:
        if self.fake:
            return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)
        g = torch.Generator().manual_seed(self.seed + sum(shape) * 7 + len(shape))
        t = low + (high - low) * torch.rand(shape, generator=g)
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def x(self, *shape: int) -> torch.Tensor:
        return self._make(shape, -1.0, 1.0, None)

    def pos(self, *shape: int) -> torch.Tensor:
        return self._make(shape, 0.5, 1.5, None)

    def unit(self, *shape: int) -> torch.Tensor:
        return self._make(shape, -0.9, 0.9, None)

    def prob(self, *shape: int) -> torch.Tensor:
        return self._make(shape, 0.1, 0.9, None)

    def sign(self, *shape: int) -> torch.Tensor:
        return torch.where(self._make(shape, -1.0, 1.0, None) > 0, 1.0, -1.0).to(self.dtype)

    def other(self, *shape: int) -> torch.Tensor:
        """A promote op's second floating input: ``other_dtype`` (fp32 for the mixed case)."""
        return self._make(shape, -1.0, 1.0, self.other_dtype or self.dtype)

    def long(self, values: Any) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    def zeros_long(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.long, device=self.device)


def _conv_args(m: Make, transposed: bool = False) -> tuple[Any, ...]:
    weight = m.x(3, 4, 3, 3) if transposed else m.x(4, 3, 3, 3)
    return (m.x(2, 3, 8, 8), weight, m.x(4), [1, 1], [1, 1], [1, 1], transposed, [0, 0], 1)


def _rnn_cell(m: Make, gates: int) -> tuple[Any, ...]:
    return m.x(2, 3), m.x(2, 4), m.x(gates * 4, 3), m.x(gates * 4, 4), m.x(gates * 4), m.x(gates * 4)


CASES: dict[str, Callable[[Make], Any]] = {
    # lower_precision_fp
    "_convolution.deprecated": lambda m: A._convolution.deprecated(*_conv_args(m), False, False, True),
    "_convolution": lambda m: A._convolution(*_conv_args(m), False, False, True, True),
    "conv1d": lambda m: A.conv1d(m.x(2, 3, 8), m.x(4, 3, 3)),
    "conv2d": lambda m: A.conv2d(m.x(2, 3, 8, 8), m.x(4, 3, 3, 3)),
    "conv3d": lambda m: A.conv3d(m.x(1, 2, 4, 4, 4), m.x(3, 2, 3, 3, 3)),
    "conv_tbc": lambda m: A.conv_tbc(m.x(8, 2, 3), m.x(3, 3, 4), m.x(4), 1),
    "conv_transpose1d": lambda m: A.conv_transpose1d(m.x(2, 3, 8), m.x(3, 4, 3)),
    "conv_transpose2d.input": lambda m: A.conv_transpose2d.input(m.x(2, 3, 8, 8), m.x(3, 4, 3, 3)),
    "conv_transpose3d.input": lambda m: A.conv_transpose3d.input(m.x(1, 2, 4, 4, 4), m.x(2, 3, 3, 3, 3)),
    "convolution": lambda m: A.convolution(*_conv_args(m)),
    "prelu": lambda m: A.prelu(m.x(2, 3, 4), m.x(3)),
    "addmm": lambda m: A.addmm(m.x(4), m.x(3, 5), m.x(5, 4)),
    "addmv": lambda m: A.addmv(m.x(3), m.x(3, 5), m.x(5)),
    "addr": lambda m: A.addr(m.x(3, 4), m.x(3), m.x(4)),
    "matmul": lambda m: A.matmul(m.x(2, 3, 5), m.x(5, 4)),
    "einsum": lambda m: A.einsum("bij,jk->bik", [m.x(2, 3, 5), m.x(5, 4)]),
    "mm": lambda m: A.mm(m.x(3, 5), m.x(5, 4)),
    "mv": lambda m: A.mv(m.x(3, 5), m.x(5)),
    "linalg_vecdot": lambda m: A.linalg_vecdot(m.x(3, 5), m.x(3, 5)),
    "linear": lambda m: A.linear(m.x(3, 5), m.x(4, 5), m.x(4)),
    "addbmm": lambda m: A.addbmm(m.x(3, 4), m.x(2, 3, 5), m.x(2, 5, 4)),
    "baddbmm": lambda m: A.baddbmm(m.x(2, 3, 4), m.x(2, 3, 5), m.x(2, 5, 4)),
    "bmm": lambda m: A.bmm(m.x(2, 3, 5), m.x(2, 5, 4)),
    "chain_matmul": lambda m: A.chain_matmul([m.x(3, 5), m.x(5, 4), m.x(4, 2)]),
    "linalg_multi_dot": lambda m: A.linalg_multi_dot([m.x(3, 5), m.x(5, 4), m.x(4, 2)]),
    "lstm_cell": lambda m: A.lstm_cell(m.x(2, 3), [m.x(2, 4), m.x(2, 4)], *_rnn_cell(m, 4)[2:]),
    "gru_cell": lambda m: A.gru_cell(*_rnn_cell(m, 3)),
    "rnn_tanh_cell": lambda m: A.rnn_tanh_cell(*_rnn_cell(m, 1)),
    "rnn_relu_cell": lambda m: A.rnn_relu_cell(*_rnn_cell(m, 1)),
    "scaled_dot_product_attention": lambda m: A.scaled_dot_product_attention(
        m.x(2, 2, 4, 8), m.x(2, 2, 4, 8), m.x(2, 2, 4, 8)
    ),
    # fp32
    "acos": lambda m: A.acos(m.unit(3, 4)),
    "asin": lambda m: A.asin(m.unit(3, 4)),
    "cosh": lambda m: A.cosh(m.x(3, 4)),
    "erfinv": lambda m: A.erfinv(m.unit(3, 4)),
    "exp": lambda m: A.exp(m.x(3, 4)),
    "expm1": lambda m: A.expm1(m.x(3, 4)),
    "log": lambda m: A.log(m.pos(3, 4)),
    "log10": lambda m: A.log10(m.pos(3, 4)),
    "log2": lambda m: A.log2(m.pos(3, 4)),
    "log1p": lambda m: A.log1p(m.pos(3, 4)),
    "reciprocal": lambda m: A.reciprocal(m.pos(3, 4)),
    "rsqrt": lambda m: A.rsqrt(m.pos(3, 4)),
    "sinh": lambda m: A.sinh(m.x(3, 4)),
    "tan": lambda m: A.tan(m.x(3, 4)),
    "pow.Tensor_Scalar": lambda m: A.pow.Tensor_Scalar(m.x(3, 4), 2),
    "pow.Tensor_Tensor": lambda m: A.pow.Tensor_Tensor(m.pos(3, 4), m.x(3, 4)),
    "pow.Scalar": lambda m: A.pow.Scalar(2.0, m.x(3, 4)),
    "softplus": lambda m: A.softplus(m.x(3, 4)),
    "layer_norm": lambda m: A.layer_norm(m.x(3, 8), [8], m.x(8), m.x(8)),
    "native_layer_norm": lambda m: A.native_layer_norm(m.x(3, 8), [8], m.x(8), m.x(8), 1e-5),
    "rms_norm": lambda m: A.rms_norm(m.x(3, 8), [8], m.x(8)),
    "group_norm": lambda m: A.group_norm(m.x(2, 4, 3), 2, m.x(4), m.x(4)),
    "frobenius_norm.dim": lambda m: A.frobenius_norm.dim(m.x(3, 4), [1]),
    "nuclear_norm": lambda m: A.nuclear_norm(m.x(3, 4)),
    "nuclear_norm.dim": lambda m: A.nuclear_norm.dim(m.x(3, 4), [0, 1]),
    "cosine_similarity": lambda m: A.cosine_similarity(m.x(3, 4), m.x(3, 4)),
    "poisson_nll_loss": lambda m: A.poisson_nll_loss(m.x(3, 4), m.pos(3, 4), True, False, 1e-8, 1),
    "cosine_embedding_loss": lambda m: A.cosine_embedding_loss(m.x(3, 4), m.x(3, 4), m.sign(3)),
    "nll_loss": lambda m: A.nll_loss(m.x(4, 5), m.long([0, 1, 2, 3])),
    "nll_loss2d": lambda m: A.nll_loss2d(m.x(2, 3, 4, 4), m.zeros_long(2, 4, 4)),
    "hinge_embedding_loss": lambda m: A.hinge_embedding_loss(m.x(3, 4), m.sign(3, 4)),
    "kl_div": lambda m: A.kl_div(m.x(3, 4), m.prob(3, 4)),
    "l1_loss": lambda m: A.l1_loss(m.x(3, 4), m.x(3, 4)),
    "smooth_l1_loss": lambda m: A.smooth_l1_loss(m.x(3, 4), m.x(3, 4)),
    "huber_loss": lambda m: A.huber_loss(m.x(3, 4), m.x(3, 4)),
    "mse_loss": lambda m: A.mse_loss(m.x(3, 4), m.x(3, 4)),
    "margin_ranking_loss": lambda m: A.margin_ranking_loss(m.x(3), m.x(3), m.sign(3)),
    "multilabel_margin_loss": lambda m: A.multilabel_margin_loss(m.x(2, 3), m.long([[0, -1, 0], [1, 2, -1]])),
    "soft_margin_loss": lambda m: A.soft_margin_loss(m.x(3, 4), m.sign(3, 4)),
    "triplet_margin_loss": lambda m: A.triplet_margin_loss(m.x(3, 4), m.x(3, 4), m.x(3, 4)),
    "multi_margin_loss": lambda m: A.multi_margin_loss(m.x(3, 4), m.long([0, 1, 3])),
    "binary_cross_entropy_with_logits": lambda m: A.binary_cross_entropy_with_logits(m.x(3, 4), m.prob(3, 4)),
    "dist": lambda m: A.dist(m.x(3, 4), m.x(3, 4)),
    "pdist": lambda m: A.pdist(m.x(4, 3)),
    "cdist": lambda m: A.cdist(m.x(4, 3), m.x(5, 3)),
    "renorm": lambda m: A.renorm(m.x(3, 4), 2, 0, 1.0),
    "logsumexp": lambda m: A.logsumexp(m.x(3, 4), [1]),
    "upsample_nearest1d": lambda m: A.upsample_nearest1d(m.x(1, 2, 4), [8]),
    "_upsample_nearest_exact1d": lambda m: A._upsample_nearest_exact1d(m.x(1, 2, 4), [8]),
    "upsample_nearest2d": lambda m: A.upsample_nearest2d(m.x(1, 2, 4, 4), [8, 8]),
    "_upsample_nearest_exact2d": lambda m: A._upsample_nearest_exact2d(m.x(1, 2, 4, 4), [8, 8]),
    "upsample_nearest3d": lambda m: A.upsample_nearest3d(m.x(1, 2, 2, 2, 2), [4, 4, 4]),
    "_upsample_nearest_exact3d": lambda m: A._upsample_nearest_exact3d(m.x(1, 2, 2, 2, 2), [4, 4, 4]),
    "upsample_linear1d": lambda m: A.upsample_linear1d(m.x(1, 2, 4), [8], False),
    "upsample_bilinear2d": lambda m: A.upsample_bilinear2d(m.x(1, 2, 4, 4), [8, 8], False),
    "_upsample_bilinear2d_aa": lambda m: A._upsample_bilinear2d_aa(m.x(1, 2, 8, 8), [4, 4], False),
    "upsample_trilinear3d": lambda m: A.upsample_trilinear3d(m.x(1, 2, 2, 2, 2), [4, 4, 4], False),
    "upsample_bicubic2d": lambda m: A.upsample_bicubic2d(m.x(1, 2, 4, 4), [8, 8], False),
    "_upsample_bicubic2d_aa": lambda m: A._upsample_bicubic2d_aa(m.x(1, 2, 8, 8), [4, 4], False),
    # fp32_set_opt_dtype
    "prod": lambda m: A.prod(m.pos(3, 4)),
    "prod.dim_int": lambda m: A.prod.dim_int(m.pos(3, 4), 1),
    "softmax.int": lambda m: A.softmax.int(m.x(3, 4), 1),
    "log_softmax.int": lambda m: A.log_softmax.int(m.x(3, 4), 1),
    "cumprod": lambda m: A.cumprod(m.pos(3, 4), 1),
    "cumsum": lambda m: A.cumsum(m.x(3, 4), 1),
    "linalg_vector_norm": lambda m: A.linalg_vector_norm(m.x(3, 4)),
    "linalg_matrix_norm": lambda m: A.linalg_matrix_norm(m.x(3, 4), 1),
    "linalg_matrix_norm.str_ord": lambda m: A.linalg_matrix_norm.str_ord(m.x(3, 4)),
    "sum": lambda m: A.sum(m.x(3, 4)),
    "sum.dim_IntList": lambda m: A.sum.dim_IntList(m.x(3, 4), [1]),
    # fp32_append_dtype
    "norm.Scalar": lambda m: A.norm.Scalar(m.x(3, 4), 2),
    "norm.ScalarOpt_dim": lambda m: A.norm.ScalarOpt_dim(m.x(3, 4), 2, [1]),
    # promote: the second floating input is ``other`` (fp32 in the mixed case)
    "addcdiv": lambda m: A.addcdiv(m.x(3, 4), m.other(3, 4), m.pos(3, 4)),
    "addcmul": lambda m: A.addcmul(m.x(3, 4), m.other(3, 4), m.x(3, 4)),
    "atan2": lambda m: A.atan2(m.x(3, 4), m.other(3, 4)),
    "bilinear": lambda m: A.bilinear(m.x(2, 3), m.other(2, 4), m.x(5, 3, 4), m.x(5)),
    "cross": lambda m: A.cross(m.x(2, 3), m.other(2, 3)),
    "dot": lambda m: A.dot(m.x(5), m.other(5)),
    "vdot": lambda m: A.vdot(m.x(5), m.other(5)),
    "grid_sampler": lambda m: A.grid_sampler(m.x(1, 1, 4, 4), m.other(1, 2, 2, 2), 0, 0, False),
    "index_put": lambda m: A.index_put(m.x(3, 4), [m.long([0, 2])], m.other(4)),
    "tensordot": lambda m: A.tensordot(m.x(3, 4), m.other(4, 5), [1], [0]),
    "scatter_add": lambda m: A.scatter_add(m.x(3, 4), 0, m.zeros_long(2, 4), m.other(2, 4)),
    # banned
    "binary_cross_entropy": lambda m: A.binary_cross_entropy(m.prob(3, 4), m.prob(3, 4)),
    # listed by CPU autocast only: CUDA autocast leaves them alone
    "avg_pool3d": lambda m: A.avg_pool3d(m.x(1, 2, 4, 4, 4), [2, 2, 2]),
    "max_pool3d": lambda m: A.max_pool3d(m.x(1, 2, 4, 4, 4), [2, 2, 2]),
    "adaptive_avg_pool3d": lambda m: A.adaptive_avg_pool3d(m.x(1, 2, 4, 4, 4), [2, 2, 2]),
    "reflection_pad1d": lambda m: A.reflection_pad1d(m.x(1, 2, 4), [1, 1]),
    "replication_pad2d": lambda m: A.replication_pad2d(m.x(1, 2, 4, 4), [1, 1, 1, 1]),
    "cat": lambda m: A.cat([m.x(2, 3), m.other(2, 3)]),
    "stack": lambda m: A.stack([m.x(2, 3), m.other(2, 3)]),
    "index_copy": lambda m: A.index_copy(m.x(3, 4), 0, m.long([1]), m.x(1, 4)),
    "cross_entropy_loss": lambda m: A.cross_entropy_loss(m.x(4, 5), m.long([0, 1, 2, 3])),
    "conv2d.padding": lambda m: A.conv2d.padding(m.x(2, 3, 8, 8), m.x(4, 3, 3, 3), None, [1, 1], "same"),
    "_addmm_activation": lambda m: A._addmm_activation(m.x(4), m.x(3, 5), m.x(5, 4)),
    "grid_sampler_2d": lambda m: A.grid_sampler_2d(m.x(1, 1, 4, 4), m.unit(1, 2, 2, 2), 0, 0, False),
    "trace": lambda m: A.trace(m.x(3, 3)),
}
"""One call of an op with small inputs: every op of the CUDA tables that has a CPU kernel, and a sample of the ops
only CPU autocast lists (pools, pads, cat/stack, cross_entropy_loss, conv2d with padding="same", ...)."""


def floats(value: Any) -> list[torch.Tensor]:
    """The floating tensors of an op's result, in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in floats(v)]
    return []
