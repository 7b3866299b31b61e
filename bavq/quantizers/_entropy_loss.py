"""The entropy loss mean_x H(p(.|x)) - H(mean_x p) as an autograd function with a chunked backward."""

from __future__ import annotations

import torch
from torch import Tensor

from bavq.quantizers._limits import LOG_P_FLOOR
from bavq.quantizers._ops import fp32_math


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner product of two (n, K) matrices without an (n, K) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _entropy_loss_grad(x: Tensor, codebook: Tensor, log_weight: Tensor, beta: float, log_mean_p: Tensor,
                       rows: int) -> Tensor:
    """Gradient w.r.t. x of sum_x [H(p(.|x)) + p(.|x) . c], c = log mean_x p fixed, chunk by chunk.

    With a_k = log_weight_k - beta d(x,k): d/da_j = p_j (g_j - sum_k p_k g_k), g = c - log p, and
    d a_j / dx = -2 beta (x - e_j), hence grad = -2 beta (x sum_j w_j - w @ E) with w = that vector.
    """
    grad = torch.empty_like(x)
    bias = log_weight - beta * codebook.square().sum(1)
    for start in range(0, x.shape[0], rows):
        xc = x[start : start + rows]
        log_p = torch.addmm(bias, xc, codebook.t(), alpha=2.0 * beta)
        log_p.sub_(log_p.amax(1, keepdim=True)).clamp_(min=LOG_P_FLOOR)
        p = log_p.exp()
        norm = p.sum(1, keepdim=True)
        p.div_(norm)
        log_p.sub_(norm.log())
        g = log_p.neg_().add_(log_mean_p)  # in place: log p is no longer needed
        w = g.sub_(_row_dot(p, g)[:, None]).mul_(p)
        grad[start : start + rows] = -2.0 * beta * (xc * w.sum(1, keepdim=True) - w @ codebook)
    return grad


class EntropyLoss(torch.autograd.Function):
    """mean_x H(p(.|x)) - H(mean_x p(.|x)) with a chunked backward that never holds N x K.

    The forward receives the value already computed by the E-step. Because
    d/dp_x [-H(mean p)] = (log mean p + 1) / N and sum_k dp_k = 0, the gradient equals that of
    (1/N) sum_x [H(p_x) + p_x . sg(log mean p)], which splits into independent row chunks.
    ``grad_scale`` (a 0-dim tensor) multiplies the row gradients, e.g. to turn this call's 1/rows
    into the 1/N of a global batch spread over ranks.
    """

    @staticmethod
    def forward(ctx, x, value, codebook, log_weight, log_mean_p, beta, rows, grad_scale):  # noqa: D102
        ctx.save_for_backward(x, codebook, log_weight, log_mean_p, grad_scale)
        ctx.beta, ctx.rows = beta, rows
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, codebook, log_weight, log_mean_p, grad_scale = ctx.saved_tensors
        with torch.no_grad(), fp32_math(x.device.type):
            grad = _entropy_loss_grad(x, codebook, log_weight, ctx.beta, log_mean_p, ctx.rows)
            grad.mul_(grad_out.float() * grad_scale / max(x.shape[0], 1))
        return grad, None, None, None, None, None, None, None
