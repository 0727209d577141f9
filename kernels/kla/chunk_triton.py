"""chunk_kla on the Triton kernels: the autograd Function and the launch of each stage.

Forward:  prepare (gc, rk, Ainv, w, u) -> fwd_h (h per chunk, vn) -> fwd_o.
Backward: prepare and fwd_h again (recomputed rather than kept, as fla does: saves memory)
          -> bwd_dv_local -> bwd_dh (dh per chunk, dvn, dh0) -> bwd_dqkg (dq, partial dkk/dgc)
          -> bwd_prepare (dw, then dk, dv, deta, dg).
"""

import torch
import triton

from . import triton_compat  # noqa: F401  (interpreter fix, see there)

from .chunk_h import chunk_kla_bwd_dh_kernel, chunk_kla_fwd_h_kernel
from .chunk_o import chunk_kla_bwd_dqkg_kernel, chunk_kla_bwd_dv_local_kernel, chunk_kla_fwd_o_kernel
from .chunk_prepare import chunk_kla_bwd_prepare_kernel, chunk_kla_fwd_prepare_kernel
from .sequences import CHUNK, chunk_layout


def numerics(x):
    """Operand dtype of the tensor-core products, their precision, and the dtype of stored intermediates.
    bf16 runs bf16 products with fp32 accumulation (as fla), tf32 inside the chunk inverse; fp32 runs true
    fp32 ("ieee", not tf32) to stay far under 1e-3. The CPU interpreter computes bf16 products wrongly
    (Triton 3.6), so there they run in fp32. (fp16 inputs are run as fp32: chunk_kla_triton.)"""
    if x.dtype == torch.bfloat16 and x.is_cuda:
        return dict(DOT_DTYPE=triton.language.bfloat16, DOT_PREC="tf32"), torch.bfloat16
    return dict(DOT_DTYPE=triton.language.float32, DOT_PREC="ieee"), x.dtype


# Warps and software-pipelining depth of each kernel (the benchmark's --sweep tries alternatives).
# 4 warps where the kernel then fits two programs per multiprocessor without spilling (ptxas -v).
LAUNCH = {
    "fwd_prepare": dict(num_warps=4, num_stages=2),
    "fwd_h": dict(num_warps=8, num_stages=2),
    "fwd_o": dict(num_warps=4, num_stages=2),
    "bwd_dv_local": dict(num_warps=8, num_stages=2),
    "bwd_dh": dict(num_warps=8, num_stages=2),
    "bwd_dqkg": dict(num_warps=8, num_stages=2),
    "bwd_prepare": dict(num_warps=8, num_stages=2),
}


def block_sizes(K, V):
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(64, triton.next_power_of_2(V)))


def state_block_v(K, V, programs_per_block, device):
    """Value block of the sequential kernels. Each program walks its document's chunks one after the
    other, so the time is the latency of that walk; narrower blocks give short batches more programs.
    (Measured on an H200 at the paper shape: BV 64 with 8 warps beat BV 32 with 4 warps.)"""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 8192 // BK))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    while BV > 16 and programs_per_block * triton.cdiv(V, BV) < 2 * sms:
        BV //= 2
    return BV


def fwd_prepare(k, v, g, eta, eps, layout, kaczmarz, flags, store_dtype, store_ainv):
    _, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV = block_sizes(K, V)
    gc = torch.empty_like(g)
    rk = torch.empty_like(g)
    Ainv = torch.empty(*g.shape, CHUNK, dtype=torch.float32, device=k.device) if store_ainv else None
    w = torch.empty(*k.shape, dtype=store_dtype, device=k.device)
    u = torch.empty(*v.shape, dtype=store_dtype, device=k.device)
    chunk_kla_fwd_prepare_kernel[(layout.num_chunks, H)](
        k, v, g, eta, gc, rk, Ainv, w, u, layout.cu_seqlens, layout.chunk_indices, eps,
        H=H, K=K, V=V, BK=BK, BV=BV, KACZMARZ=kaczmarz, STORE_AINV=store_ainv, **flags,
        **LAUNCH["fwd_prepare"])
    return gc, rk, Ainv, w, u


def fwd_h(k, rk, gc, w, u, initial_state, output_final_state, layout, flags, store_dtype):
    _, T, H, K = k.shape
    V = u.shape[-1]
    N = layout.num_seqs
    BK, _ = block_sizes(K, V)
    BV = state_block_v(K, V, N * H, k.device)
    h = torch.empty(layout.num_chunks, H, K, V, dtype=store_dtype, device=k.device)
    vn = torch.empty_like(u)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    chunk_kla_fwd_h_kernel[(triton.cdiv(V, BV), N * H)](
        k, rk, gc, w, u, h, vn, initial_state, ht, layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, **flags, **LAUNCH["fwd_h"])
    return h, vn, ht


class ChunkKLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, eta, initial_state, scale, eps, output_final_state, cu_seqlens, normalize_q,
                kaczmarz):
        B, T, H, K = k.shape
        V = v.shape[-1]
        flags, store_dtype = numerics(q)
        layout = chunk_layout(B, T, cu_seqlens, q.device)
        gc, rk, _, w, u = fwd_prepare(k, v, g, eta, eps, layout, kaczmarz, flags, store_dtype, store_ainv=False)
        h, vn, ht = fwd_h(k, rk, gc, w, u, initial_state, output_final_state, layout, flags, store_dtype)
        o = torch.empty_like(v)
        BK, BV = block_sizes(K, V)
        chunk_kla_fwd_o_kernel[(layout.num_chunks, H)](
            q, k, rk, gc, h, vn, o, layout.cu_seqlens, layout.chunk_indices, scale, eps,
            H=H, K=K, V=V, BK=BK, BV=BV, NORMALIZE_Q=normalize_q, **flags, **LAUNCH["fwd_o"])
        ctx.save_for_backward(q, k, v, g, eta, initial_state)
        ctx.options = (scale, eps, layout, normalize_q, kaczmarz)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, eta, initial_state = ctx.saved_tensors
        scale, eps, layout, normalize_q, kaczmarz = ctx.options
        H, K, V, N = k.shape[2], k.shape[3], v.shape[-1], layout.num_seqs
        BK, BV = block_sizes(K, V)
        flags, store_dtype = numerics(q)
        do = do.contiguous()
        gc, rk, Ainv, w, u = fwd_prepare(k, v, g, eta, eps, layout, kaczmarz, flags, store_dtype, store_ainv=True)
        h, vn, _ = fwd_h(k, rk, gc, w, u, initial_state, False, layout, flags, store_dtype)
        per_chunk = (layout.num_chunks, H)
        sequences = layout.cu_seqlens, layout.chunk_indices
        dv_local = torch.empty_like(vn)
        chunk_kla_bwd_dv_local_kernel[per_chunk](q, k, rk, gc, do, dv_local, *sequences, scale, eps,
                                                 H=H, K=K, V=V, BK=BK, BV=BV, NORMALIZE_Q=normalize_q, **flags,
                                                 **LAUNCH["bwd_dv_local"])
        dh = torch.empty_like(h)
        dvn = torch.empty_like(vn)
        dh0 = torch.empty_like(initial_state) if initial_state is not None else None
        BV_state = state_block_v(K, V, N * H, q.device)
        chunk_kla_bwd_dh_kernel[(triton.cdiv(V, BV_state), N * H)](
            q, k, rk, gc, w, do, dv_local, dh, dvn, dht, dh0, layout.cu_seqlens, layout.chunk_offsets, scale, eps,
            H=H, K=K, V=V, BK=BK, BV=BV_state, NORMALIZE_Q=normalize_q, USE_FINAL_STATE_GRAD=dht is not None,
            STORE_INITIAL_STATE_GRAD=dh0 is not None, **flags, **LAUNCH["bwd_dh"])
        dq = torch.empty_like(q)
        dkk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        dgc = torch.empty_like(g)
        chunk_kla_bwd_dqkg_kernel[per_chunk](q, k, rk, gc, h, vn, do, dh, dq, dkk, dgc, *sequences,
                                             scale, eps, H=H, K=K, V=V, BK=BK, BV=BV, NORMALIZE_Q=normalize_q,
                                             **flags, **LAUNCH["bwd_dqkg"])
        dk, dv, deta, dg = torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta), torch.empty_like(g)
        chunk_kla_bwd_prepare_kernel[per_chunk](k, v, eta, gc, rk, Ainv, h, dvn, dkk, dgc, dk, dv, deta, dg,
                                                *sequences, H=H, K=K, V=V, BK=BK, BV=BV, KACZMARZ=kaczmarz,
                                                **flags, **LAUNCH["bwd_prepare"])
        return dq, dk, dv, dg, deta, dh0, None, None, None, None, None, None


def chunk_kla_triton(q, k, v, g, eta, scale, eps, initial_state, output_final_state, cu_seqlens, normalize_q,
                     beta_mode):
    if q.dtype == torch.float16:  # values scaled by 1/|k| can leave fp16's range: run in fp32, return fp16
        o, final_state = chunk_kla_triton(q.float(), k.float(), v.float(), g, eta, scale, eps, initial_state,
                                          output_final_state, cu_seqlens, normalize_q, beta_mode)
        return o.half(), final_state
    q, k, v = (x.contiguous() for x in (q, k, v))
    g, eta = g.float().contiguous(), eta.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkKLAFunction.apply(q, k, v, g, eta, initial_state, scale, eps, output_final_state, cu_seqlens,
                                  normalize_q, beta_mode == "kaczmarz")
