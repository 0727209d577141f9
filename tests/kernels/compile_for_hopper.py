"""Compile every Triton kernel of kernels/ for Hopper (sm_90) without a GPU, and print what ptxas
reports (registers, spills) and the shared memory each needs. Run as a script, outside the
interpreter: python tests/kernels/compile_for_hopper.py

The CPU interpreter runs kernels as NumPy and misses what only the compiler sees (constexpr rules,
types, shared memory); this catches those in CI. Each launch of the real wrappers is turned into a
compile for the target, with the divisibility hints a CUDA launch would give."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_MEMORY_LIMIT = 232448  # bytes a block may use on H100/H200
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    bound = dict(zip(self.arg_names, args), **{k: v for k, v in kwargs.items() if k in self.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(self.params):
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32" if isinstance(value, float) else "i32"
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report).group(1)
    spills = re.search(r"(\d+) bytes spill stores", report).group(1)
    print(f"{self.__name__:36s} warps {kernel.metadata.num_warps}  registers {registers:>3}  spill bytes "
          f"{spills:>5}  shared {kernel.metadata.shared:>6}", flush=True)
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT, f"{self.__name__} needs too much shared memory"


def main():
    JITFunction.run = compile_instead_of_launch
    from kernels.conv import conv1d_triton
    from kernels.kla import chunk_triton, fused_recurrent_triton, spans

    torch.cuda.get_device_properties = lambda device: type("Properties", (), {"multi_processor_count": 132})
    # B, H big enough that the state walks get their widest value block, as at training shapes;
    # every head-dim class in bf16: the paper's, 128 and the largest supported. (fp32 products compile to
    # heavily spilling code that takes ptxas minutes per kernel on 2 cores; run by hand on 2026-11-26, every
    # fp32 variant fit, 165 KB of shared memory at most, and the fp32 GPU tests cover them.)
    for dtype, (B, T, H, K, V) in ((torch.bfloat16, (8, 130, 12, 96, 192)), (torch.bfloat16, (4, 130, 16, 128, 128)),
                                   (torch.bfloat16, (8, 130, 16, 256, 256))):
        print(f"{dtype} B {B} T {T} H {H} K {K} V {V}")
        # CPU tensors pick the interpreter's fp32 products; compile what a CUDA launch compiles
        dot = tl.bfloat16 if dtype == torch.bfloat16 else tl.float32
        chunk_triton.numerics = lambda x: (dict(DOT_DTYPE=dot, DOT_PREC="tf32" if dot == tl.bfloat16 else "ieee"),
                                           dtype)
        q, k = torch.randn(2, B, T, H, K, dtype=dtype)
        v = torch.randn(B, T, H, V, dtype=dtype)
        g, eta, h0 = -torch.rand(B, T, H), torch.rand(B, T, H), torch.randn(B, H, K, V)
        ctx = type("Context", (), {"save_for_backward": lambda self, *t: setattr(self, "saved_tensors", t)})()
        chunk_triton.ChunkKLAFunction.forward(ctx, q, k, v, g, eta, h0, 0.1, 1e-6, True, None, True, True, False)
        chunk_triton.ChunkKLAFunction.backward(ctx, torch.randn_like(v), torch.randn_like(h0))
        fused_recurrent_triton.fused_recurrent_kla_triton(q, k, v, g, eta, 0.1, 1e-6, h0, True, None, True,
                                                          "kaczmarz", None)
        # context parallelism: the transition walks of fwd_h / bwd_dh and apply_state
        span = spans.TritonSpan(q, k, v, g, eta, 0.1, 1e-6, None, True, "kaczmarz", True)
        span.summary((0, B))
        span.outputs(h0)
        span.initial_state_grads(torch.randn_like(v), (0, B))
        span.input_grads(h0)
    # causal_conv1d at the paper's width (W = 4) and the largest (8), bf16 and fp32, with and without packed
    # documents, states in and out, its output whole or as the mixer's q, k, v.
    for dtype, W, packed, split in ((torch.bfloat16, 4, False, (1152, 1152, 2304)),
                                    (torch.bfloat16, 4, True, (1152, 1152, 2304)), (torch.float32, 8, True, (4608,))):
        print(f"causal_conv1d {dtype} W {W} packed {packed} split {split}")
        x = torch.randn(1 if packed else 4, 300, 4608, dtype=dtype)
        cu_seqlens = torch.tensor([0, 100, 300]) if packed else None
        h0 = torch.randn(2 if packed else 4, 4608, W - 1, dtype=dtype)
        ctx = type("Context", (), {"save_for_backward": lambda self, *t: setattr(self, "saved_tensors", t),
                                   "set_materialize_grads": lambda self, value: None})()
        *ys, _ = conv1d_triton.CausalConv1dFunction.forward(ctx, x, torch.randn(4608, W), h0, True, cu_seqlens, "silu",
                                                            split, None)
        conv1d_triton.CausalConv1dFunction.backward(ctx, *map(torch.randn_like, ys), torch.randn_like(h0))
    print("all kernels compiled for sm_90")


if __name__ == "__main__":
    main()
