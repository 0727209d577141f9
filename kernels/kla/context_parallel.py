"""chunk_kla over a sequence split across ranks (context parallelism), passing the recurrent state.

Rank r of the group holds the r-th contiguous slice of every sequence. Its span maps the state entering its
first document to the state leaving its last one affinely, h_out = M_r h_in + N_r (spans.py). Forward:
  1. each rank runs its slice from zero: N_r, and M_r where the slice lies inside one document that began
     on an earlier rank (elsewhere the incoming state never reaches the end: M_r = 0);
  2. one all-gather of (M_r, N_r), fp32, R x H x K x (K + V) per rank (R = B, or 1 with packed documents);
  3. every rank folds the ranks before it: S_out(j) = M_j S_out(j - 1) + N_j, S_in(r) = S_out(r - 1)
     where its first document continues, else zero;
  4. its outputs with S_in(r).
Backward, in reverse: gradients of the initial states with zero final-state gradients, D_r (zero where
the first document starts fresh); one all-gather of D_r (R x H x K x V); the fold from the last rank down,
G(j - 1) = D_j + M_j^T G(j), gives each rank the gradient G(r) of its final state; then the input gradients.
With packed documents only the first document meets S_in and only the last one G(r); a document may span
any number of ranks, and the state restarts at every document start, wherever it lies.
"""

import torch
import torch.distributed as dist

from ..context_parallel import gather_from_ranks
from .inputs import check_inputs, use_triton
from .spans import TorchSpan, TritonSpan


# The folds run in float64: a few small products, and immune to a process-wide TF32 matmul setting.

def incoming_state(transitions, finals, rank):
    """S_out(rank - 1) from every rank's (M_j, N_j): transitions [ranks, R, H, K, K], finals [ranks, R, H, K, V]."""
    state = torch.zeros_like(finals[0], dtype=torch.float64)
    for j in range(rank):
        state = transitions[j].double() @ state + finals[j].double()
    return state.float()


def outgoing_state_grad(transitions, initial_grads, rank):
    """G(rank), the gradient of `rank`'s final state, from every rank's M_j and D_j [ranks, R, H, K, V]."""
    grad = torch.zeros_like(initial_grads[0], dtype=torch.float64)
    for j in range(initial_grads.shape[0] - 1, rank, -1):
        grad = initial_grads[j].double() + transitions[j].double().transpose(-1, -2) @ grad
    return grad.float()


class ContextParallelKLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, eta, span_type, options, group, first_document_continues):
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        packed = options[2] is not None  # cu_seqlens
        span = span_type(q, k, v, g, eta, *options)
        N, H, K, V = span.num_seqs, k.shape[2], k.shape[3], v.shape[3]
        first_docs = (0, 1) if packed else (0, N)     # the documents an incoming state enters
        last_docs = (N - 1, N) if packed else (0, N)  # the documents whose final state leaves
        continues = rank > 0 and (first_document_continues or not packed)
        passes_through = continues and first_docs == last_docs

        finals, transitions = span.summary(first_docs if continues else None)
        R = first_docs[1] - first_docs[0]
        if not passes_through:
            transitions = finals.new_zeros(R, H, K, K)
        summaries = gather_from_ranks(torch.cat([transitions.flatten(), finals[last_docs[0]:last_docs[1]].flatten()]),
                                      group)
        all_transitions = summaries[:, :R * H * K * K].view(ranks, R, H, K, K)
        x = incoming_state(all_transitions, summaries[:, R * H * K * K:].view(ranks, R, H, K, V), rank) \
            if continues else None
        o = span.outputs(x)

        ctx.save_for_backward(*span.saved_tensors(), x, all_transitions)
        ctx.span_type, ctx.setup, ctx.group = span_type, span.setup(), group
        ctx.docs = first_docs, last_docs, continues
        return o

    @staticmethod
    def backward(ctx, do):
        *saved, x, all_transitions = ctx.saved_tensors
        (first_docs, last_docs, continues), group = ctx.docs, ctx.group
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        span = ctx.span_type.restore(saved, x, first_docs, ctx.setup)
        has_next = rank + 1 < ranks
        initial_grads = span.initial_state_grads(do, last_docs if has_next else None)[first_docs[0]:first_docs[1]]
        gathered = gather_from_ranks(initial_grads if continues else torch.zeros_like(initial_grads), group)
        dht = outgoing_state_grad(all_transitions, gathered, rank) if has_next else None
        return (*span.input_grads(dht), None, None, None, None)


def chunk_kla_context_parallel(q, k, v, g, eta, *, group, scale=None, eps=1e-6, cu_seqlens=None,
                               first_document_continues=True, normalize_q=True, beta_mode="kaczmarz", backend="auto",
                               keep_states=True):
    """chunk_kla over sequences split across the ranks of `group`: this rank's o for its slice.

    q, k, v, g, eta: this rank's contiguous slice of every sequence, as chunk_kla takes them (rank order =
    order along the sequence; slices may differ in length but not in B, H, K, V). Without cu_seqlens each of
    the B rows is one sequence over all ranks. With cu_seqlens (this rank's local document offsets, B = 1),
    first_document_continues says whether the slice's first document began on an earlier rank (False when
    a document starts at its first token; ignored on rank 0); kernels.context_parallel.local_documents
    derives both from global offsets. Every rank of the group must call this, with the same options.
    Outputs and the gradients of q, k, v, g, eta equal those of chunk_kla on the whole sequences; there is no
    initial or final state. Communication per call: one all-gather of R H K (K + V) fp32 per rank forward,
    one of R H K V backward (R = B, or 1 with cu_seqlens), whatever the sequence length.
    """
    check_inputs(q, k, v, g, eta, None, cu_seqlens, beta_mode, backend)
    if q.shape[1] == 0:
        raise ValueError("every context-parallel rank needs at least one token of the sequence")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    span_type = TritonSpan if use_triton(backend, q, v) else TorchSpan
    o = ContextParallelKLAFunction.apply(*span_type.prepare(q, k, v, g, eta), span_type,
                                         (scale, eps, cu_seqlens, normalize_q, beta_mode, keep_states), group,
                                         first_document_continues)
    return o.to(v.dtype)
