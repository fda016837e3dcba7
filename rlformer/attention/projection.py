"""The attention's input / output projections: y = x W^T + b with the bias gradient as a matrix-vector product.

``nn.Linear`` on (B, T, D) input is ``addmm`` on (B*T, D) rows; autograd hands the bias an (N, D) gradient and the
engine reduces it (``sum_to``, a sum over dim 0). On CUDA that reduction of a tall half-precision matrix launches a
global reduce whose float32 staging buffer is sized num_outputs x ctas_per_output x block.x x vec x 4 bytes: 64 MiB
for N = 16384, D = 512 (measured, ``scripts/probe_layer_memory.py --cpp``, BENCHMARKS.md session 12), more than the
whole attention output, and alive at the peak of a layer step whose peak is the output projection's backward.
``linear`` computes the same gradient as ones(N)^T dy (one GEMV, float32 accumulation, no staging) and is otherwise
``F.linear``: the same saved tensors (x, W), the same two matrix products for dx and dW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Linear(torch.autograd.Function):
    """F.linear(x, w, b) whose backward gives db = ones^T dy (see the module docstring). Double backward works:
    the backward is made of differentiable ops."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = grad @ weight
        if ctx.needs_input_grad[1]:
            dw = rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.new_ones(rows.shape[0]) @ rows
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, as ``F.linear`` (autocast included: inputs are cast to the autocast dtype first, as autocast does
    for ``F.linear``), with the bias gradient of ``_Linear``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _Linear.apply(x, weight, bias)
    return _Linear.apply(x, weight, bias)


class Projection(nn.Linear):
    """``nn.Linear`` (same parameters, state_dict and init) whose forward is ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
