"""chunk_kla on the Triton kernels: the autograd Function and the launch of each stage.

Forward:  fwd_solve (gc, rk, rq, Ainv; kept) -> fwd_wu (w, u) -> fwd_h (h per chunk, vn) -> fwd_o.
Backward: [fwd_wu and fwd_h again, unless w, h, vn were kept] -> bwd_dv_local
          -> bwd_dh (dh per chunk, dvn, dh0) -> bwd_dqkg (dq, partial dkk/dgc, dw) -> bwd_prepare (dk, dv,
          deta, dg).
fwd_h and bwd_dh can also walk the transitions of some documents, which apply_state turns into the states
from any incoming state (or final-state gradient): context parallelism is built on these (spans.py).
"""

from dataclasses import dataclass

import torch
import triton

from ..common import triton_compat  # noqa: F401  (interpreter fix, see there)

from .chunk_h import chunk_kla_apply_state_kernel, chunk_kla_bwd_dh_kernel, chunk_kla_fwd_h_kernel
from .chunk_o import chunk_kla_bwd_dqkg_kernel, chunk_kla_bwd_dv_local_kernel, chunk_kla_fwd_o_kernel
from .chunk_prepare import chunk_kla_bwd_prepare_kernel, chunk_kla_fwd_solve_kernel, chunk_kla_fwd_wu_kernel
from .sequences import CHUNK, chunk_layout


def numerics(x):
    """Operand dtype of the tensor-core products, their precision, and the dtype of stored intermediates.
    bf16 runs bf16 products with fp32 accumulation (as fla), tf32 inside the chunk inverse; fp32 runs true
    fp32 ("ieee", not tf32) to stay far under 1e-3. The CPU interpreter computes bf16 products wrongly
    (Triton 3.6), so there they run in fp32. (fp16 inputs are run as fp32: chunk_kla_triton.)"""
    if x.dtype == torch.bfloat16 and x.is_cuda:
        return dict(DOT_DTYPE=triton.language.bfloat16, DOT_PREC="tf32"), torch.bfloat16
    return dict(DOT_DTYPE=triton.language.float32, DOT_PREC="ieee"), x.dtype


# Launch options of each kernel: warps, software-pipelining depth and, where the kernel has one, the value
# block BV (a grid dimension or an inner loop). bench/kernel_stages.py times every stage alone over these.
LAUNCH = {
    "fwd_solve": dict(num_warps=4, num_stages=1),
    "fwd_wu": dict(num_warps=2, num_stages=3, BV=64),
    "fwd_h": dict(num_warps=4, num_stages=2, BV=64),
    "fwd_o": dict(num_warps=4, num_stages=3, BV=64),
    "bwd_dv_local": dict(num_warps=4, num_stages=2, BV=64),
    "bwd_dh": dict(num_warps=4, num_stages=3, BV=64),
    "bwd_dqkg": dict(num_warps=8, num_stages=3, BV=64),
    "bwd_prepare": dict(num_warps=4, num_stages=3, BV=64),
    "apply_state": dict(num_warps=4, num_stages=2, BV=64),
}
APPLY_STATE_KEY_BLOCK = 32  # the contraction block of apply_state: a [K, 32] slice of a transition at a time


def launch_options(stage, K, V, element_size):
    """(BV, options) of a stage: BV no wider than V needs (at least 16, for the tensor cores). LAUNCH is
    tuned for bf16 with K <= 128; wider key rows (K > 128, or fp32 operands) get shallower pipelining,
    as deeper buffers of such [BT, BK] tiles overflow shared memory (tests/kernels/compile_for_hopper.py)."""
    options = dict(LAUNCH[stage])
    BV = options.pop("BV", None)
    row_bytes = key_block(K) * element_size
    options["num_stages"] = min(options["num_stages"], 3 if row_bytes <= 256 else 2 if row_bytes <= 512 else 1)
    return (None if BV is None else max(16, min(BV, triton.next_power_of_2(V)))), options


def key_block(K):
    return max(16, triton.next_power_of_2(K))


def state_block_v(stage, K, V, element_size, walks, transition_walks, device):
    """Column block of the sequential kernels, which run walks x cdiv(V, BV) programs on the values and
    transition_walks x cdiv(K, BV) on transitions. Each program walks its document's chunks one after the
    other, so the time is the latency of that walk; short batches get narrower blocks, hence more programs."""
    BV, options = launch_options(stage, K, V, element_size)
    BV = min(BV, 8192 // key_block(K))  # the [BK, BV] fp32 state block stays in registers
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    while BV > 16 and walks * triton.cdiv(V, BV) + transition_walks * triton.cdiv(K, BV) < 2 * sms:
        BV //= 2
    return BV, options


@dataclass
class TransitionWalk:
    """What a transition walk of fwd_h / bwd_dh wrote for documents first_seq .. end_seq - 1: the per-chunk
    transitions [their chunks, H, K, K] and new values [their tokens, H, K] (see chunk_h.py), and the
    transitions over whole documents, final [end_seq - first_seq, H, K, K] fp32."""
    first_seq: int
    end_seq: int
    states: torch.Tensor
    values: torch.Tensor
    final: torch.Tensor


class Stages:
    """The launches of one chunk_kla call; every stage is also callable alone (bench/kernel_stages.py)."""

    def __init__(self, q, k, v, g, eta, scale, eps, layout, normalize_q, kaczmarz):
        self.q, self.k, self.v, self.g, self.eta = q, k, v, g, eta
        self.scale, self.eps, self.normalize_q, self.kaczmarz = scale, eps, normalize_q, kaczmarz
        self.H, self.K = k.shape[2:]
        self.V = v.shape[-1]
        self.BK = key_block(self.K)
        self.flags, self.store_dtype = numerics(q)
        self.element_size = 2 if self.flags["DOT_DTYPE"] == triton.language.bfloat16 else 4
        self.layout = layout
        self.sequences = self.layout.cu_seqlens, self.layout.chunk_indices

    def per_chunk(self, stage):
        """Grid (chunk [x value block], head) and launch options of a per-chunk stage. A chunk's value blocks
        are neighbours in the grid, so they run side by side and share their q, k reads through L2."""
        BV, options = launch_options(stage, self.K, self.V, self.element_size)
        value_blocks = triton.cdiv(self.V, BV) if stage in ("fwd_o", "bwd_dv_local") else 1
        grid = (self.layout.num_chunks * value_blocks, self.H)
        return grid, dict(H=self.H, K=self.K, BK=self.BK, **({} if BV is None else dict(V=self.V, BV=BV)),
                          **self.flags, **options)

    def sequential(self, stage, transitions):
        """Grid and options of fwd_h / bwd_dh; transitions = (first_seq, end_seq) adds their transition walks."""
        N, H = self.layout.num_seqs, self.H
        first_seq, end_seq = transitions or (0, 0)
        BV, options = state_block_v(stage, self.K, self.V, self.element_size, N * H, (end_seq - first_seq) * H,
                                    self.q.device)
        column_blocks = triton.cdiv(self.V, BV) + (triton.cdiv(self.K, BV) if transitions else 0)
        return (column_blocks, N * H), dict(first_seq=first_seq, end_seq=end_seq, H=H, K=self.K, V=self.V,
                                            BK=self.BK, BV=BV, TRANSITIONS=transitions is not None, **self.flags,
                                            **options)

    def transition_walk(self, transitions, dtype, device):
        """Empty outputs of the transition walks of documents transitions = (first_seq, end_seq), or None."""
        if transitions is None:
            return None
        H, K = self.H, self.K
        first_token, end_token, first_chunk, end_chunk = self.layout.span(*transitions)
        return TransitionWalk(*transitions, torch.empty(end_chunk - first_chunk, H, K, K, dtype=dtype, device=device),
                              torch.empty(end_token - first_token, H, K, dtype=dtype, device=device),
                              torch.empty(transitions[1] - transitions[0], H, K, K, dtype=torch.float32, device=device))

    def fwd_solve(self):
        """(gc, rk, rq): the chunk-local cumulative log decay and the key and query inverse norms; Ainv."""
        gc, rk, rq = (torch.empty_like(self.g) for _ in range(3))
        Ainv = torch.empty(*self.g.shape, CHUNK, dtype=self.store_dtype, device=self.k.device)
        grid, options = self.per_chunk("fwd_solve")
        chunk_kla_fwd_solve_kernel[grid](self.q, self.k, self.g, self.eta, gc, rk, rq, Ainv, *self.sequences,
                                         self.eps, NORMALIZE_Q=self.normalize_q, **options)
        return (gc, rk, rq), Ainv

    def fwd_wu(self, per_token, Ainv):
        gc, rk, _ = per_token
        w = torch.empty(self.k.shape, dtype=self.store_dtype, device=self.k.device)
        u = torch.empty(self.v.shape, dtype=self.store_dtype, device=self.k.device)
        grid, options = self.per_chunk("fwd_wu")
        chunk_kla_fwd_wu_kernel[grid](self.k, self.v, self.eta, gc, rk, Ainv, w, u, *self.sequences,
                                      KACZMARZ=self.kaczmarz, **options)
        return w, u

    def fwd_h(self, per_token, w, u, initial_state, output_final_state, transitions=None):
        """(h, vn, final state or None, TransitionWalk of documents transitions = (first_seq, end_seq) or None)."""
        gc, rk, _ = per_token
        N, H, K, V = self.layout.num_seqs, self.H, self.K, self.V
        h = torch.empty(self.layout.num_chunks, H, K, V, dtype=self.store_dtype, device=u.device)
        vn = torch.empty_like(u)
        ht = torch.empty(N, H, K, V, dtype=torch.float32, device=u.device) if output_final_state else None
        walk = self.transition_walk(transitions, self.store_dtype, u.device)
        grid, options = self.sequential("fwd_h", transitions)
        chunk_kla_fwd_h_kernel[grid](self.k, rk, gc, w, u, h, vn, initial_state, ht,
                                     *((walk.states, walk.values, walk.final) if walk else (None,) * 3),
                                     self.layout.cu_seqlens, self.layout.chunk_offsets,
                                     USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
                                     **options)
        return h, vn, ht, walk

    def fwd_o(self, per_token, h, vn):
        gc, rk, rq = per_token
        o = torch.empty_like(self.v)
        grid, options = self.per_chunk("fwd_o")
        chunk_kla_fwd_o_kernel[grid](self.q, self.k, rk, rq, gc, h, vn, o, *self.sequences, self.scale, **options)
        return o

    def bwd_dv_local(self, per_token, do):
        gc, rk, rq = per_token
        dv_local = torch.empty(self.v.shape, dtype=self.store_dtype, device=do.device)
        grid, options = self.per_chunk("bwd_dv_local")
        chunk_kla_bwd_dv_local_kernel[grid](self.q, self.k, rk, rq, gc, do, dv_local, *self.sequences, self.scale,
                                            **options)
        return dv_local

    def bwd_dh(self, per_token, w, do, dv_local, dht, store_dh0, transitions=None):
        """(dh, dvn, dh0 [N, H, K, V] fp32 if store_dh0, TransitionWalk of documents transitions or None)."""
        gc, rk, rq = per_token
        N, H, K, V = self.layout.num_seqs, self.H, self.K, self.V
        dh = torch.empty(self.layout.num_chunks, H, K, V, dtype=self.store_dtype, device=do.device)
        dvn = torch.empty_like(dv_local)
        dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=do.device) if store_dh0 else None
        walk = self.transition_walk(transitions, dv_local.dtype, do.device)
        grid, options = self.sequential("bwd_dh", transitions)
        chunk_kla_bwd_dh_kernel[grid](self.q, self.k, rk, rq, gc, w, do, dv_local, dh, dvn, dht, dh0,
                                      *((walk.states, walk.values, walk.final) if walk else (None,) * 3),
                                      self.layout.cu_seqlens, self.layout.chunk_offsets, scale=self.scale,
                                      USE_FINAL_STATE_GRAD=dht is not None, STORE_INITIAL_STATE_GRAD=store_dh0,
                                      **options)
        return dh, dvn, dh0, walk

    def apply_state(self, states, values, walk, x):
        """In place: states += walk.states x, values += walk.values x on the walked documents' chunks, x
        [walk.end_seq - walk.first_seq, H, K, V] fp32 (h, vn from zero -> from x; or dh, dvn likewise)."""
        _, _, first_chunk, end_chunk = self.layout.span(walk.first_seq, walk.end_seq)
        BV, options = launch_options("apply_state", self.K, self.V, self.element_size)
        grid = ((end_chunk - first_chunk) * triton.cdiv(self.V, BV), self.H)
        precision = "tf32" if self.flags["DOT_DTYPE"] == triton.language.bfloat16 else "ieee"
        chunk_kla_apply_state_kernel[grid](states, values, walk.states, walk.values, x.float().contiguous(),
                                           self.layout.cu_seqlens, self.layout.chunk_indices,
                                           self.layout.chunk_offsets, walk.first_seq, H=self.H, K=self.K, V=self.V,
                                           BK=self.BK, BC=APPLY_STATE_KEY_BLOCK, BV=BV, DOT_PREC=precision,
                                           **options)

    def bwd_dqkg(self, per_token, h, vn, do, dh, dvn):
        gc, rk, rq = per_token
        dq = torch.empty_like(self.q)
        dkk = torch.empty(self.k.shape, dtype=torch.float32, device=self.k.device)
        dgc = torch.empty_like(self.g)
        dw = torch.empty(self.k.shape, dtype=self.store_dtype, device=self.k.device)
        grid, options = self.per_chunk("bwd_dqkg")
        chunk_kla_bwd_dqkg_kernel[grid](self.q, self.k, rk, rq, gc, h, vn, do, dh, dvn, dq, dkk, dgc, dw,
                                        *self.sequences, self.scale, NORMALIZE_Q=self.normalize_q, **options)
        return dq, dkk, dgc, dw

    def bwd_prepare(self, per_token, Ainv, dvn, dw, dkk, dgc):
        gc, rk, _ = per_token
        dk, dv = torch.empty_like(self.k), torch.empty_like(self.v)
        deta, dg = torch.empty_like(self.eta), torch.empty_like(self.g)
        grid, options = self.per_chunk("bwd_prepare")
        chunk_kla_bwd_prepare_kernel[grid](self.k, self.v, self.eta, gc, rk, Ainv, dvn, dw, dkk, dgc, dk, dv, deta,
                                           dg, *self.sequences, KACZMARZ=self.kaczmarz, **options)
        return dk, dv, deta, dg


class ChunkKLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, eta, initial_state, scale, eps, output_final_state, cu_seqlens, normalize_q,
                kaczmarz, keep_states):
        layout = chunk_layout(q.shape[0], q.shape[1], cu_seqlens, q.device)
        stages = Stages(q, k, v, g, eta, scale, eps, layout, normalize_q, kaczmarz)
        per_token, Ainv = stages.fwd_solve()
        w, u = stages.fwd_wu(per_token, Ainv)
        h, vn, ht, _ = stages.fwd_h(per_token, w, u, initial_state, output_final_state)
        o = stages.fwd_o(per_token, h, vn)
        ctx.save_for_backward(q, k, v, g, eta, initial_state, *per_token, Ainv,
                              *((w, h, vn) if keep_states else (None,) * 3))
        ctx.options = (scale, eps, layout, normalize_q, kaczmarz)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, eta, initial_state, gc, rk, rq, Ainv, w, h, vn = ctx.saved_tensors
        stages = Stages(q, k, v, g, eta, *ctx.options)
        per_token = gc, rk, rq
        do = do.contiguous()
        if h is None:  # not kept: recomputed (deterministic, so the same values)
            w, u = stages.fwd_wu(per_token, Ainv)
            h, vn, _, _ = stages.fwd_h(per_token, w, u, initial_state, False)
        dv_local = stages.bwd_dv_local(per_token, do)
        dh, dvn, dh0, _ = stages.bwd_dh(per_token, w, do, dv_local, dht, initial_state is not None)
        dq, dkk, dgc, dw = stages.bwd_dqkg(per_token, h, vn, do, dh, dvn)
        dk, dv, deta, dg = stages.bwd_prepare(per_token, Ainv, dvn, dw, dkk, dgc)
        return dq, dk, dv, dg, deta, dh0, None, None, None, None, None, None, None


def chunk_kla_triton(q, k, v, g, eta, scale, eps, initial_state, output_final_state, cu_seqlens, normalize_q,
                     beta_mode, keep_states=True):
    if q.dtype == torch.float16:  # values scaled by 1/|k| can leave fp16's range: run in fp32, return fp16
        o, final_state = chunk_kla_triton(q.float(), k.float(), v.float(), g, eta, scale, eps, initial_state,
                                          output_final_state, cu_seqlens, normalize_q, beta_mode, keep_states)
        return o.half(), final_state
    q, k, v = (x.contiguous() for x in (q, k, v))
    g, eta = g.float().contiguous(), eta.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkKLAFunction.apply(q, k, v, g, eta, initial_state, scale, eps, output_final_state, cu_seqlens,
                                  normalize_q, beta_mode == "kaczmarz", keep_states)
