"""The training loss: output head + cross-entropy in chunks of rows, never the whole [tokens, vocab] logits.

For the 270M at 4 x 256 tokens the logits alone are 1 GiB in fp32, and autograd through F.linear +
F.cross_entropy keeps several tensors of that size (logits, log-softmax, their gradients). Here each chunk of
rows is projected into one reused buffer, turned in place into its gradient by softmax_cross_entropy_ (one op,
its rows' losses as a by-product), and the gradients of the hidden states and the head weight are taken from
it at once, in the forward: the loss is the graph's last node, so its backward only scales them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 rows of a 262144 vocabulary (128 MiB fp32)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ops, ignore_index):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = int((targets != ignore_index).sum())
        scale = 1.0 / max(valid, 1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)  # bf16 training: the head in bf16, from the fp32 master weight
        rows = max(1, min(n, CHUNK_ELEMENTS // vocab))
        buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(vocab, weight.shape[1], dtype=torch.float32, device=hidden.device) \
            if need_grad else None
        for r0 in range(0, n, rows):
            h = hidden[r0:r0 + rows]
            logits = buf[:h.shape[0]]
            if h.dtype == torch.float32:
                torch.mm(h, w.t(), out=logits)
            else:
                logits.copy_(h @ w.t())
            total += ops.softmax_cross_entropy_(logits, targets[r0:r0 + rows], scale, ignore_index).double().sum()
            if need_grad:  # logits now hold d loss / d logits
                g = logits if h.dtype == torch.float32 else logits.to(h.dtype)
                torch.mm(g, w, out=grad_hidden[r0:r0 + rows])
                if h.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += g.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return (total * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # gradient accumulation scales the loss
            grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ops,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight^T, targets): hidden [N, H], weight [V, H],
    targets [N] (ignore_index = not counted). `ops` supplies softmax_cross_entropy_ (ops.training_ops)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: targets {tuple(targets.shape)} must be [{hidden.shape[0]}]")
    return _ChunkedHeadLoss.apply(hidden, weight, targets.long().contiguous(), ops, ignore_index)
