"""Context parallelism by state passing equals one process, on the CPU (gloo; Triton under the interpreter).

Four processes are spawned once. Cases over 2 ranks run in two CP groups, ranks {0, 1} and {2, 3} (as CP
inside data parallelism: the group passed in is what counts); cases over 4 ranks use them all. Each rank
runs its slice of sequences drawn from one seed; the test process runs chunk_kla (same backend) on the
whole sequences, and the slices' outputs and q, k, v, g, eta gradients, put back together, must match it.
The conv halo exchange is checked in the same processes, values and gradients.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import chunk_kla, chunk_kla_context_parallel, conv_halo, local_documents
from kla_testing import make_inputs, rel_err

TOL = 1e-5  # fp32: both backends and the reference agree to about 1e-7 .. 1e-6
WORLD = 4
H, K, V = 2, 16, 32
# 4 x 128 tokens: one document over ranks 0-2, rank 1 inside it, a document ending exactly at rank 3's start
DOCS_4 = [0, 40, 300, 384, 450, 512]
# 2 x 150 tokens: an empty document, a document over both ranks, three documents on rank 1
DOCS_2 = [0, 30, 30, 170, 171, 230, 300]


@dataclass(frozen=True)
class Case:
    backend: str
    ranks: int
    slices: tuple        # tokens per rank
    batch: int = 1
    docs: tuple = None   # global document offsets (packed, batch 1)
    beta_mode: str = "kaczmarz"
    keep_states: bool = True
    seed: int = 0

    def inputs(self):
        """Whole sequences, the same in every process; gates drawn around slow decay so the state crosses ranks."""
        q, k, v, g, eta = make_inputs(self.batch, sum(self.slices), H, K, V, seed=self.seed)
        return q, k, v, g * 0.1, eta

    def bounds(self, rank):
        start = sum(self.slices[:rank])
        return start, start + self.slices[rank]


CASES = [
    Case("torch", 2, (150, 150), batch=2),
    Case("torch", 2, (70, 128), batch=2, beta_mode="sigmoid", seed=1),  # unequal slices
    Case("torch", 2, (150, 150), docs=tuple(DOCS_2), seed=2),
    Case("torch", 2, (150, 150), docs=tuple(DOCS_2), beta_mode="sigmoid", seed=3),
    Case("torch", 4, (128,) * 4, batch=2, seed=4),
    Case("torch", 4, (128,) * 4, docs=tuple(DOCS_4), seed=5),
    Case("torch", 4, (128,) * 4, docs=tuple(DOCS_4), beta_mode="sigmoid", seed=6),
    Case("triton", 2, (128, 128), batch=2, seed=7),
    Case("triton", 2, (150, 192), batch=2, beta_mode="sigmoid", seed=8),
    Case("triton", 2, (150, 150), docs=tuple(DOCS_2), keep_states=False, seed=9),
    Case("triton", 4, (128,) * 4, docs=tuple(DOCS_4), seed=10),
    Case("triton", 4, (128,) * 4, docs=tuple(DOCS_4), beta_mode="sigmoid", seed=11),
]


def cotangent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_slice(case, rank, group):
    """This rank's o and input gradients for its slice."""
    start, end = case.bounds(rank)
    full = case.inputs()
    inputs = [x[:, start:end].clone().requires_grad_() for x in full]
    options = dict(group=group, beta_mode=case.beta_mode, backend=case.backend, keep_states=case.keep_states)
    if case.docs is not None:
        options["cu_seqlens"], options["first_document_continues"] = local_documents(case.docs, start, end)
    o = chunk_kla_context_parallel(*inputs, **options)
    do = cotangent(o.shape[:1] + (sum(case.slices),) + o.shape[2:], case.seed + 100)[:, start:end]
    return {"o": o.detach(), "grads": torch.autograd.grad(o, inputs, do)}


def reference(case):
    inputs = [x.requires_grad_() for x in case.inputs()]
    offsets = None if case.docs is None else torch.tensor(case.docs)
    o, _ = chunk_kla(*inputs, cu_seqlens=offsets, beta_mode=case.beta_mode, backend=case.backend)
    return {"o": o.detach(), "grads": torch.autograd.grad(o, inputs, cotangent(o.shape, case.seed + 100))}


# The conv halo: width-4 convolution over C channels, x a strided view of a wider projection. Packed: on 4 ranks of
# 5 tokens the document starting at 3 reaches rank 1 with 2 tokens (the halo's first is zero), rank 2 starts fresh
WIDTH, C = 4, 6
HALO_CASES = [dict(slices=(5,) * 4, batch=2, docs=None),
              dict(slices=(5,) * 4, batch=1, docs=(0, 3, 7, 10, 12, 17, 20)),
              dict(slices=(5, 6), batch=1, docs=(0, 4, 11))]


def halo_setup(case, rank):
    """(first token, end token, local document options) of `rank`'s slice."""
    start = sum(case["slices"][:rank])
    end = start + case["slices"][rank]
    if case["docs"] is None:
        return start, end, {}
    offsets, continues = local_documents(case["docs"], start, end)
    return start, end, dict(cu_seqlens=offsets, first_document_continues=continues)


def halo_data(case):
    """The projection x is a view of, the gradient arriving at the conv input, and each rank's halo gradient."""
    T = sum(case["slices"])
    projection, dy = cotangent((case["batch"], T, C + 5), 1), cotangent((case["batch"], T, C), 2)
    rows = [case["batch"] if case["docs"] is None else halo_setup(case, r)[2]["cu_seqlens"].numel() - 1
            for r in range(len(case["slices"]))]
    return projection, dy, [cotangent((n, C, WIDTH - 1), 10 + r) for r, n in enumerate(rows)]


def run_halo(case, rank, group):
    start, end, options = halo_setup(case, rank)
    projection, dy, dhalos = halo_data(case)
    projection = projection[:, start:end].clone().requires_grad_()
    x = projection[..., 3:3 + C]
    x_out, halo = conv_halo(x, WIDTH, group=group, **options)
    assert torch.equal(x_out, x)
    ((x_out * dy[:, start:end]).sum() + (halo * dhalos[rank]).sum()).backward()
    return {"halo": halo.detach(), "grad": projection.grad}


def halo_reference(case):
    """Every rank's halo and the gradient of the whole projection, token by token: rank r's halo holds the
    width - 1 tokens before its start that lie in its first document (rows: all, or the first document's)."""
    projection, dy, dhalos = halo_data(case)
    halos = [torch.zeros_like(d) for d in dhalos]
    grad = torch.zeros_like(projection)
    grad[..., 3:3 + C] = dy
    for r in range(1, len(case["slices"])):
        start, _, options = halo_setup(case, r)
        if not options.get("first_document_continues", True):
            continue
        doc_start = 0 if case["docs"] is None else max(d for d in case["docs"] if d <= start)
        rows = slice(None) if case["docs"] is None else slice(0, 1)
        for i in range(WIDTH - 1):
            t = start - (WIDTH - 1) + i
            if t >= doc_start:
                halos[r][rows, :, i] = projection[:, t, 3:3 + C]
                grad[:, t, 3:3 + C] += dhalos[r][rows, :, i]
    return halos, grad


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for i, case in enumerate(CASES):
            group = dist.group.WORLD if case.ranks == WORLD else pairs[rank // 2]
            result = run_slice(case, dist.get_rank(group), group)
            torch.save(result, f"{out_dir}/case{i}_rank{rank}.pt")
        for i, case in enumerate(HALO_CASES):
            group = dist.group.WORLD if len(case["slices"]) == WORLD else pairs[rank // 2]
            torch.save(run_halo(case, dist.get_rank(group), group), f"{out_dir}/halo{i}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return lambda name, rank: torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


def slices_of(case, world_rank):
    """The world ranks that ran `case` together, in group order."""
    if case.ranks == WORLD:
        return list(range(WORLD))
    return [0, 1] if world_rank < 2 else [2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[
    f"{c.backend}-{c.ranks}ranks-{'docs' if c.docs else f'B{c.batch}'}-{c.beta_mode}"
    + ("" if c.keep_states else "-recompute") for c in CASES])
def test_context_parallel_equals_one_process(results, index):
    case = CASES[index]
    ref = reference(case)
    for first in ({0} if case.ranks == WORLD else {0, 2}):
        ranks = [results(f"case{index}", r) for r in slices_of(case, first)]
        errors = {"o": rel_err(torch.cat([r["o"] for r in ranks], 1), ref["o"])}
        for i, name in enumerate("q k v g eta".split()):
            errors["d" + name] = rel_err(torch.cat([r["grads"][i] for r in ranks], 1), ref["grads"][i])
        print(f"{case}: " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()))
        assert max(errors.values()) < TOL, f"{case}: {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(HALO_CASES)))
def test_conv_halo_values_and_gradients(results, index):
    case = HALO_CASES[index]
    halos, grad = halo_reference(case)
    for world_ranks in [list(range(WORLD))] if len(case["slices"]) == WORLD else [[0, 1], [2, 3]]:
        got = [results(f"halo{index}", r) for r in world_ranks]
        for rank, (result, halo) in enumerate(zip(got, halos)):
            torch.testing.assert_close(result["halo"], halo, rtol=0, atol=0, msg=f"halo of rank {rank}")
        torch.testing.assert_close(torch.cat([r["grad"] for r in got], 1), grad, rtol=0, atol=1e-6)


def test_bad_input_is_refused_before_any_communication():
    q, k, v, g, eta = make_inputs(2, 64, H, K, V)
    with pytest.raises(ValueError, match="B == 1"):
        chunk_kla_context_parallel(q, k, v, g, eta, group=None, cu_seqlens=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="at least one token"):
        chunk_kla_context_parallel(q[:, :0], k[:, :0], v[:, :0], g[:, :0], eta[:, :0], group=None)
    with pytest.raises(ValueError, match="width - 1"):
        conv_halo(q[:, :2, 0], 4, group=None)
