"""The training loss: output head + cross-entropy in chunks of rows, never the whole [tokens, vocab] logits.

For the 270M at 4 x 256 tokens the logits alone are 1 GiB in fp32, and autograd through F.linear +
F.cross_entropy keeps several tensors of that size (logits, log-softmax, their gradients). Here each chunk of
tokens is projected into one reused buffer (transposed, [vocab, tokens]: the orientation whose GEMMs run
fastest here), turned in place into its gradient by softmax_cross_entropy_ (one op, the tokens' losses as a
by-product), and the gradients of the hidden states and the head weight are taken from it at once, in the
forward: the loss is the graph's last node, so its backward only scales them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logits per chunk: 256 tokens of a 262144 vocabulary (256 MiB fp32). The head's GEMMs ran at 150-190 GFLOP/s with
# 256 tokens a chunk and 105-145 with 128 (2-core EPYC, transposed orientation), so the buffer pays for itself.
CHUNK_ELEMENTS = 1 << 26


class TiedWeightGrad:
    """Joins the two uses of a tied embedding/head weight in one forward. The loss leaves the head's weight
    gradient here instead of returning it, and the embedding lookup's backward (which autograd runs last) adds
    its rows into it and returns the sum: autograd sees one [vocab, hidden] gradient. Returned separately, the
    two would be two dense tensors and a third for their sum (the lookup's gradient is sparse in essence, but
    a sparse one is densified when added): 1.3 GB more at the 270M."""

    def __init__(self):
        self.grad_weight: torch.Tensor | None = None


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, tied):
        ctx.save_for_backward(ids)
        ctx.tied, ctx.shape, ctx.dtype = tied, weight.shape, weight.dtype
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        grad_weight, ctx.tied.grad_weight = ctx.tied.grad_weight, None
        if grad_weight is None:  # no chunked loss on this forward (e.g. logits taken from hidden_states)
            grad_weight = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)
        grad_weight.index_add_(0, ids.flatten(), grad.reshape(-1, ctx.shape[1]).to(grad_weight.dtype))
        return None, grad_weight.to(ctx.dtype), None


def tied_embedding(ids: torch.Tensor, weight: torch.Tensor, tied: TiedWeightGrad) -> torch.Tensor:
    """F.embedding(ids, weight) whose weight gradient also carries the head's (see TiedWeightGrad)."""
    return _TiedEmbedding.apply(ids, weight, tied)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ops, ignore_index, tied, need_grad, normalizer):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = int((targets != ignore_index).sum())
        scale = 1.0 / (normalizer if normalizer is not None else max(valid, 1))
        w = weight.to(hidden.dtype)  # bf16 training: the head in bf16, from the fp32 master weight
        rows = max(1, min(n, CHUNK_ELEMENTS // vocab))
        buf = torch.empty(vocab * rows, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(vocab, weight.shape[1], dtype=torch.float32, device=hidden.device) \
            if need_grad else None
        for r0 in range(0, n, rows):
            h = hidden[r0:r0 + rows]
            logits_t = buf[:vocab * h.shape[0]].view(vocab, h.shape[0])  # [V, rows]: the fast orientation
            if h.dtype == torch.float32:
                torch.mm(w, h.t(), out=logits_t)
            else:
                logits_t.copy_(w @ h.t())
            total += ops.softmax_cross_entropy_(logits_t, targets[r0:r0 + rows], scale, ignore_index).double().sum()
            if need_grad:  # logits_t now holds d loss / d logits, transposed
                if h.dtype == torch.float32:
                    torch.mm(logits_t.t(), w, out=grad_hidden[r0:r0 + rows])
                else:
                    grad_hidden[r0:r0 + rows] = logits_t.t().to(h.dtype) @ w
                grad_weight.addmm_(logits_t, h.float())
        # Plain attributes, not save_for_backward: backward takes them off ctx, so autograd can adopt grad_weight
        # as the weight's .grad instead of copying it (a saved tensor is still referenced: 671 MB more, 270M).
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.tied = weight.dtype, tied
        return (total * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        if grad_loss.item() != 1.0:  # gradient accumulation scales the loss
            grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
        if ctx.tied is not None:  # the embedding's backward returns it, with its own rows added
            ctx.tied.grad_weight, grad_weight = grad_weight, None
        else:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ops,
                          ignore_index: int = IGNORE_INDEX, tied: TiedWeightGrad | None = None,
                          normalizer: float | None = None) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight^T, targets): hidden [N, H], weight [V, H],
    targets [N] (ignore_index = not counted). `ops` supplies softmax_cross_entropy_ (ops.training_ops). With
    `tied`, the weight's gradient is handed to the tied_embedding of the same forward instead. normalizer: the
    sum is divided by it instead of by the number of counted rows."""
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"chunked_cross_entropy: normalizer must be > 0, got {normalizer}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: targets {tuple(targets.shape)} must be [{hidden.shape[0]}]")
    # Whether to take the gradients in the forward is decided here: inside forward() grad mode is always off,
    # and ctx.needs_input_grad is True under torch.no_grad() too (evaluation would pay for two more GEMMs).
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(hidden, weight, targets.long().contiguous(), ops, ignore_index, tied, need_grad,
                                  normalizer)
