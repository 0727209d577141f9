"""Context parallelism on 2 GPUs (NCCL) equals chunk_kla on one, at the paper's heads.

The test process computes chunk_kla on the whole sequences on GPU 0 and then spawns two ranks, one per GPU,
which run their halves with chunk_kla_context_parallel. bf16: relative error under 2e-3 for outputs and
5e-3 for the q, k, v, g, eta gradients (both paths round their intermediates to bf16, each its own way);
each assertion message also gives both paths' error against the fp32 torch backend, which tells whether
the two differ because CP is less accurate or because one GPU is. fp32 is held to the CPU tests' 1e-5.
Run on a machine with 2 GPUs: pytest -m gpu tests/kernels/test_kla_context_parallel_gpu.py
"""

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import chunk_kla, chunk_kla_context_parallel, local_documents
from kla_testing import make_inputs, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

RANKS = 2
TOLERANCES = {torch.bfloat16: (2e-3, 5e-3), torch.float32: (1e-5, 1e-5)}  # (outputs, gradients)


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    batch: int
    tokens: int  # per rank
    docs: tuple = None
    beta_mode: str = "kaczmarz"
    keep_states: bool = True

    def inputs(self, device):
        q, k, v, g, eta = make_inputs(self.batch, RANKS * self.tokens, 12, 96, 192, dtype=self.dtype, seed=3)
        return [x.to(device) for x in (q, k, v, g * 0.05, eta)]  # slow decay: the state crosses the boundary


CASES = [
    Case(torch.bfloat16, 2, 8192),
    Case(torch.bfloat16, 1, 16384, docs=(0, 5000, 20000, 20100, 32768)),
    Case(torch.bfloat16, 1, 16384, docs=(0, 100, 16384, 20000, 32768), beta_mode="sigmoid", keep_states=False),
    Case(torch.float32, 1, 4096, docs=(0, 1000, 6000, 8192)),
]


def cotangent(case, shape, device):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, case.dtype)


def run_whole(case, backend, upcast):
    """o and the input gradients of chunk_kla on the whole sequences on GPU 0 (q, k, v in fp32 if upcast)."""
    inputs = [(x.float() if upcast else x).requires_grad_() for x in case.inputs("cuda:0")]
    offsets = None if case.docs is None else torch.tensor(case.docs, device="cuda:0")
    o, _ = chunk_kla(*inputs, cu_seqlens=offsets, beta_mode=case.beta_mode, backend=backend)
    grads = torch.autograd.grad(o, inputs, cotangent(case, o.shape, "cuda:0").to(o.dtype))
    return [t.detach().cpu().float() for t in (o, *grads)]


def _worker(rank, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=RANKS,
                            device_id=torch.device("cuda", rank))
    try:
        for i, case in enumerate(CASES):
            start, end = rank * case.tokens, (rank + 1) * case.tokens
            inputs = [x[:, start:end].contiguous().requires_grad_() for x in case.inputs(f"cuda:{rank}")]
            options = dict(group=dist.group.WORLD, beta_mode=case.beta_mode, keep_states=case.keep_states)
            if case.docs is not None:
                offsets, options["first_document_continues"] = local_documents(case.docs, start, end)
                options["cu_seqlens"] = offsets.cuda()
            o = chunk_kla_context_parallel(*inputs, **options)
            do = cotangent(case, (case.batch, RANKS * case.tokens, 12, 192), f"cuda:{rank}")[:, start:end]
            grads = torch.autograd.grad(o, inputs, do)
            torch.save([t.detach().cpu().float() for t in (o, *grads)], f"{out_dir}/case{i}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_gpu")
    mp.spawn(_worker, args=(str(out),), nprocs=RANKS, join=True)
    return lambda i: [torch.load(out / f"case{i}_rank{r}.pt", weights_only=True) for r in range(RANKS)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[
    f"{str(c.dtype)[6:]}-{'docs' if c.docs else f'B{c.batch}'}-{c.beta_mode}" + ("" if c.keep_states else "-recompute")
    for c in CASES])
def test_context_parallel_on_two_gpus_equals_one(results, index):
    case = CASES[index]
    one_gpu = run_whole(case, "triton", upcast=False)
    exact = run_whole(case, "torch", upcast=True)
    cp = [torch.cat(parts, 1) for parts in zip(*results(index))]
    names = ["o", "dq", "dk", "dv", "dg", "deta"]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, cp, one_gpu)}
    against_fp32 = {n: (round(rel_err(a, e), 6), round(rel_err(b, e), 6)) for n, a, b, e in zip(names, cp, one_gpu,
                                                                                                   exact)}
    print(f"{case}: CP vs one GPU {errors}; (CP, one GPU) vs fp32 torch {against_fp32}")
    out_tol, grad_tol = TOLERANCES[case.dtype]
    bad = {n: e for n, e in errors.items() if not e < (out_tol if n == "o" else grad_tol)}
    assert not bad, f"{case}: over tolerance {bad}; all {errors}; (CP, one GPU) vs fp32 torch {against_fp32}"
