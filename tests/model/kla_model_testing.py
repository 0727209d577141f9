"""Shared pieces of the model tests: a one-process megatron world, an error measure, and an
independent float64 token-by-token implementation of docs/design.md section 1 (the mixer's contract).

The reference reads nothing from kla_megatron or kernels except the parameter tensors it is given:
the in_proj row layout [q | k | v | z | b | a] (all heads of one kind together, head-major inside
each part) and the conv channel order [q | k | v] are the ones documented in kla_megatron/mixer.py.
"""

import contextlib
import os
import socket

import torch
import torch.nn.functional as F


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; anything non-finite counts as infinitely wrong."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def megatron_world(tensor_parallel: int = 1, rank: int = 0, world_size: int = 1, port: int = None):
    """torch.distributed (gloo) + megatron parallel_state for the duration of the block."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port if port is not None else free_port())
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(tensor_parallel, 1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def mixer_params(mixer) -> dict:
    """The mixer's parameters (the tensors themselves) under the names the reference uses."""
    return {
        "in_proj": mixer.in_proj.weight,
        "out_proj": mixer.out_proj.weight,
        "conv": mixer.conv_weight,
        "A_log": mixer.A_log,
        "dt_bias": mixer.dt_bias,
        "norm": mixer.norm_weight,
    }


def reference_mixer(x, p, *, heads, key_dim, value_dim, beta_mode, eps, norm_eps, cu_seqlens=None):
    """docs/design.md section 1, literally, in float64, one token at a time.

    x [s, b, d]; p: in_proj [H(2K+2V+2), d], out_proj [d, H V], conv [H(2K+V), W], A_log [H],
    dt_bias [H], norm [H, V]. cu_seqlens (b = 1): document offsets; conv taps and the state
    restart at each document start. Returns y [s, b, d] float64 (differentiable in x and p).
    """
    H, K, V = heads, key_dim, value_dim
    x = x.double()
    p = {name: t.double() for name, t in p.items()}
    s, b, _ = x.shape
    proj = torch.einsum("sbd,nd->bsn", x, p["in_proj"])  # [b, s, n]
    q_in, k_in, v_in, z, beta_logit, a = torch.split(proj, [H * K, H * K, H * V, H * V, H, H], dim=-1)
    pre = torch.cat([q_in, k_in, v_in], dim=-1)  # conv channels [q | k | v]
    W = p["conv"].shape[1]

    starts = torch.zeros(s, dtype=torch.long)  # the first token of each token's document
    if cu_seqlens is not None:
        assert b == 1
        bounds = [int(c) for c in cu_seqlens]
        for lo, hi in zip(bounds, bounds[1:]):
            starts[lo:hi] = lo

    A = torch.exp(p["A_log"])
    scale = K ** -0.5
    S = torch.zeros(b, H, V, K, dtype=torch.float64)  # the notes' V x K state per head (docs/design.md)
    outputs = []
    for t in range(s):
        if t == starts[t]:
            S = torch.zeros(b, H, V, K, dtype=torch.float64)
        # causal depthwise conv, kernel W: out[t] = sum_j w[:, j] x[t - W + 1 + j], within the document
        conv = torch.zeros_like(pre[:, 0])
        for j in range(W):
            src = t - (W - 1) + j
            if src >= starts[t]:
                conv = conv + p["conv"][:, j] * pre[:, src]
        conv = F.silu(conv)
        q = conv[:, : H * K].reshape(b, H, K)
        k = conv[:, H * K : 2 * H * K].reshape(b, H, K)
        v = conv[:, 2 * H * K :].reshape(b, H, V)
        g = -A * F.softplus(a[:, t] + p["dt_bias"])  # [b, H]
        alpha = torch.exp(g)
        eta = torch.sigmoid(beta_logit[:, t])
        q = q / q.norm(dim=-1, keepdim=True)
        if beta_mode == "kaczmarz":
            beta = eta / (k.square().sum(-1) + eps)  # raw keys
        elif beta_mode == "sigmoid":
            k = k / k.norm(dim=-1, keepdim=True)
            beta = eta
        else:
            raise ValueError(beta_mode)
        decayed = alpha[..., None, None] * S
        prediction = torch.einsum("bhvk,bhk->bhv", decayed, k)  # alpha S_{t-1} k_t
        S = decayed + beta[..., None, None] * torch.einsum("bhv,bhk->bhvk", v - prediction, k)
        o = torch.einsum("bhvk,bhk->bhv", S, q) * scale
        # per-head RMSNorm over V, weight [H, V], then the SiLU(z) gate
        o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + norm_eps) * p["norm"]
        o = o * F.silu(z[:, t].reshape(b, H, V))
        outputs.append(o.reshape(b, H * V))
    o = torch.stack(outputs, 0)  # [s, b, H V]
    return torch.einsum("sbn,dn->sbd", o, p["out_proj"])
