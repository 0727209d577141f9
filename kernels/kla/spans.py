"""A span of tokens run in two halves around an exchange of states: what context parallelism runs on each
rank, on either backend.

The recurrence is affine in the state a document starts from: over a span, its final state is
    h_out = transition @ h_in + zero_start_state
(transition K x K, the product of the per-token transitions alpha_t (I - eta_t kk_t kk_t^T); states are
K x V). A span computes these first and takes the true incoming state afterwards:

    summary(docs)            run from zero: every document's final state, and the transitions of the
                             documents `docs` = (first, end), those an incoming state will reach
    outputs(x)               o, with x [end - first, H, K, V] (or None: all zero) entering those documents
    initial_state_grads(do, docs)   backward from zero final-state gradients: every document's initial-state
                             gradient, and the transposed transitions of `docs`, those a gradient will reach
    input_grads(dht)         dq, dk, dv, dg, deta, with dht entering the final states of those documents

Between the halves the caller only needs the small per-document matrices, so the exchange does not grow
with the sequence. TritonSpan walks the transitions beside the states in one launch and corrects the
states in place (chunk_h.py); TorchSpan widens the state of chunk_kla_torch and reruns it (CPU and CI).
"""

import torch

from .chunk_torch import chunk_kla_torch
from .chunk_triton import Stages
from .sequences import chunk_layout


def document_rows(x, num_seqs, docs):
    """[num_seqs, *x.shape[1:]] fp32, zero but for rows docs = (first, end), which are x."""
    full = x.new_zeros(num_seqs, *x.shape[1:], dtype=torch.float32)
    full[docs[0]:docs[1]] = x
    return full


class TritonSpan:
    """The fused kernels: fwd_h walks the states from zero and, in extra programs of the same launch, the
    transitions of the first documents; apply_state then turns their zero-start states and new values into
    those from the incoming state, in place. The backward mirrors it with bwd_dh. Compared with chunk_kla,
    one light kernel per direction is added, and no second walk."""

    def __init__(self, q, k, v, g, eta, scale, eps, cu_seqlens, normalize_q, beta_mode, keep_states, layout=None):
        self.inputs = (q, k, v, g, eta)
        self.keep_states = keep_states
        self.layout = layout or chunk_layout(q.shape[0], q.shape[1], cu_seqlens, q.device)
        self.options = (scale, eps, cu_seqlens, normalize_q, beta_mode)
        self.stages = Stages(q, k, v, g, eta, scale, eps, self.layout, normalize_q, beta_mode == "kaczmarz")
        self.num_seqs = self.layout.num_seqs

    @staticmethod
    def prepare(q, k, v, g, eta):
        """The kernels' input forms: fp16 runs as fp32 (values scaled by 1/|k| can leave fp16's range)."""
        if q.dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        return q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(), eta.float().contiguous()

    def summary(self, docs):
        stages = self.stages
        self.per_token, self.Ainv = stages.fwd_solve()
        self.w, u = stages.fwd_wu(self.per_token, self.Ainv)
        self.h, self.vn, finals, self.walk = stages.fwd_h(self.per_token, self.w, u, None, True, docs)
        return finals, (self.walk.final if self.walk else None)

    def outputs(self, x):
        if x is not None:
            self.stages.apply_state(self.h, self.vn, self.walk, x)
        self.walk = None
        return self.stages.fwd_o(self.per_token, self.h, self.vn)

    def saved_tensors(self):
        kept = (self.w, self.h, self.vn) if self.keep_states else (None,) * 3
        return (*self.inputs, *self.per_token, self.Ainv, *kept)

    def setup(self):
        return (*self.options, self.keep_states, self.layout)

    @classmethod
    def restore(cls, saved, x, docs, setup):
        """The span again in the backward, from saved_tensors(), the incoming state x of `docs` and setup()."""
        q, k, v, g, eta, gc, rk, rq, Ainv, w, h, vn = saved
        span = cls(q, k, v, g, eta, *setup)
        span.per_token, span.Ainv = (gc, rk, rq), Ainv
        if h is None:  # not kept: recomputed, from the incoming state this time
            w, u = span.stages.fwd_wu(span.per_token, Ainv)
            initial_state = None if x is None else document_rows(x, span.num_seqs, docs)
            h, vn, _, _ = span.stages.fwd_h(span.per_token, w, u, initial_state, False)
        span.w, span.h, span.vn = w, h, vn
        return span

    def initial_state_grads(self, do, docs):
        self.do = do.contiguous()
        dv_local = self.stages.bwd_dv_local(self.per_token, self.do)
        self.dh, self.dvn, dh0, self.walk = self.stages.bwd_dh(self.per_token, self.w, self.do, dv_local, None, True,
                                                               docs)
        return dh0

    def input_grads(self, dht):
        stages = self.stages
        if dht is not None:
            stages.apply_state(self.dh, self.dvn, self.walk, dht)
        dq, dkk, dgc, dw = stages.bwd_dqkg(self.per_token, self.h, self.vn, self.do, self.dh, self.dvn)
        dk, dv, deta, dg = stages.bwd_prepare(self.per_token, self.Ainv, self.dvn, dw, dkk, dgc)
        return dq, dk, dv, dg, deta


class TorchSpan:
    """The torch backend. The summary is one chunk_kla_torch run whose state has K more columns, zero values
    and the identity as their start in the documents `docs`: those columns end as the transitions. The
    outputs rerun the span from the incoming state; the backward reruns it under autograd."""

    def __init__(self, q, k, v, g, eta, scale, eps, cu_seqlens, normalize_q, beta_mode, keep_states=True):
        self.inputs = (q, k, v, g, eta)
        self.options = (scale, eps, cu_seqlens, normalize_q, beta_mode)
        self.num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        self.state_shape = (self.num_seqs, k.shape[2], k.shape[3], v.shape[3])

    @staticmethod
    def prepare(q, k, v, g, eta):
        return q, k, v, g, eta

    def run(self, inputs, initial_state):
        scale, eps, cu_seqlens, normalize_q, beta_mode = self.options
        return chunk_kla_torch(*inputs, scale, eps, initial_state, True, cu_seqlens, normalize_q, beta_mode)

    def summary(self, docs):
        q, k, v, g, eta = self.inputs
        N, H, K, V = self.state_shape
        widened = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1)
        start = k.new_zeros(N, H, K, V + K, dtype=torch.float32)
        if docs is not None:
            start[docs[0]:docs[1], :, :, V:] = torch.eye(K, dtype=torch.float32, device=k.device)
        with torch.no_grad():
            _, finals = self.run((q, k, widened, g, eta), start)
        self.docs_in = docs
        return finals[..., :V].contiguous(), (finals[docs[0]:docs[1], ..., V:].contiguous() if docs else None)

    def initial_state(self):
        if self.x is None:
            return self.inputs[1].new_zeros(self.state_shape, dtype=torch.float32)
        return document_rows(self.x, self.num_seqs, self.docs_in)

    def outputs(self, x):
        self.x = x
        with torch.no_grad():
            return self.run(self.inputs, self.initial_state())[0]

    def saved_tensors(self):
        return self.inputs

    def setup(self):
        return self.options

    @classmethod
    def restore(cls, saved, x, docs, setup):
        span = cls(*saved, *setup)
        span.x, span.docs_in = x, docs
        return span

    def initial_state_grads(self, do, docs):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in self.inputs]
            h0 = self.initial_state().requires_grad_()
            o, finals = self.run(leaves, h0)
        self.graph, self.do, self.docs_out = (leaves, o, finals), do, docs
        return torch.autograd.grad(o, h0, do, retain_graph=True)[0]

    def input_grads(self, dht):
        leaves, o, finals = self.graph
        dfinals = torch.zeros_like(finals) if dht is None else document_rows(dht, self.num_seqs, self.docs_out)
        return torch.autograd.grad([o, finals], leaves, [self.do, dfinals])
