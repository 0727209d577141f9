"""vocab_parallel_cross_entropy: the language-model loss on logits as the output layer wrote them.

Each row's loss is logsumexp(logits) - logits[label], over a vocabulary that tensor parallelism may split
across ranks (each holds a contiguous slice). Per rank: the running max m, the sum s of exp(logit - m) and the
label's logit, in fp32, in one read of the logits; across ranks two all-reduces of one number per row. The
backward writes softmax - onehot into the logits' own buffer (they are dead by then), so no fp32 copy of the
[tokens, vocabulary] logits ever exists. Without a group it is the plain loss.
"""

import torch
import torch.distributed as dist

from ..common.inputs import check_backend, use_triton


def vocab_parallel_cross_entropy(logits, labels, *, group=None, backend="auto"):
    """logits [..., V_local] (bf16/fp16/fp32, this rank's vocabulary slice [rank V_local, (rank+1) V_local)),
    labels [...] int (global ids) -> per-token loss [...] fp32. Differentiable in logits."""
    check_backend(backend)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading dims {tuple(logits.shape[:-1])}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64, got {labels.dtype}")
    return CrossEntropyFunction.apply(logits, labels, group, use_triton(backend, logits))


def _combine(local_max, local_sum, label_logit, group):
    """Per-row (max, log sum exp(x - max), label logit) over the ranks of `group` from each rank's
    (max, sum exp(x - max), label logit or 0). Kept apart: max + log(sum) would round away the loss of rows
    of large logits."""
    if group is not None and dist.get_world_size(group) > 1:
        row_max = local_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([local_sum * torch.exp(local_max - row_max), label_logit])
        dist.all_reduce(both, group=group)
        local_sum, label_logit, local_max = both[0], both[1], row_max
    return local_max, torch.log(local_sum), label_logit


def _vocab_start(logits, group):
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * logits.shape[-1]


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, triton):
        shape = labels.shape
        x = logits.reshape(-1, logits.shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        local_labels = labels.reshape(-1).long() - _vocab_start(logits, group)
        if triton:
            from .cross_entropy_triton import row_statistics

            local_max, local_sum, label_logit = row_statistics(x, local_labels)
        else:
            x32 = x.float()
            local_max = x32.max(-1).values
            local_sum = torch.exp(x32 - local_max[:, None]).sum(-1)
            inside = (local_labels >= 0) & (local_labels < x.shape[-1])
            label_logit = torch.where(inside, x32.gather(1, local_labels.clamp(0, x.shape[-1] - 1)[:, None])[:, 0], 0.0)
        row_max, log_sum, label_logit = _combine(local_max, local_sum, label_logit, group)
        ctx.save_for_backward(x, local_labels, row_max, log_sum)
        ctx.triton = triton
        ctx.logits_shape = logits.shape
        return ((row_max - label_logit) + log_sum).reshape(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, local_labels, row_max, log_sum = ctx.saved_tensors
        grad_loss = grad_loss.reshape(-1).float()
        if ctx.triton:
            from .cross_entropy_triton import softmax_minus_onehot_

            grad = softmax_minus_onehot_(x, local_labels, row_max, log_sum, grad_loss)
        else:
            grad = torch.exp((x.float() - row_max[:, None]) - log_sum[:, None])
            inside = (local_labels >= 0) & (local_labels < x.shape[-1])
            rows = torch.arange(x.shape[0], device=x.device)[inside]
            grad[rows, local_labels[inside]] -= 1.0
            grad = (grad * grad_loss[:, None]).to(x.dtype)
        return grad.reshape(ctx.logits_shape), None, None, None
