"""vocab_parallel_cross_entropy against float64 log-softmax: the loss and the logits' gradient, on the whole
vocabulary and split over two gloo ranks (each holding a vocabulary slice, as megatron's output layer does)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kernels import vocab_parallel_cross_entropy
from kla_testing import rel_err

BACKENDS = ["torch", "triton"]
ROWS, VOCAB = 37, 300  # not a multiple of the kernel's block: the masked tail is exercised


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, VOCAB, generator=gen) * 4
    logits[0] = -1e4  # a row of equal, very negative logits
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    cotangent = torch.rand(ROWS, generator=gen)
    return logits, labels, cotangent


def reference(logits, labels, cotangent):
    x = logits.double().requires_grad_(True)
    loss = F.cross_entropy(x, labels, reduction="none")
    (grad,) = torch.autograd.grad((loss * cotangent.double()).sum(), x)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_matches_log_softmax(backend, dtype, tol):
    logits, labels, cotangent = inputs()
    ref_loss, ref_grad = reference(logits.to(dtype), labels, cotangent)
    x = logits.to(dtype).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x.view(ROWS, 1, VOCAB), labels.view(ROWS, 1), backend=backend).view(ROWS)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-6  # the statistics are fp32 whatever the logits' dtype
    (grad,) = torch.autograd.grad((loss * cotangent).sum(), x)
    assert rel_err(grad, ref_grad) < tol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_worker(rank, port, backend, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    logits, labels, cotangent = inputs()
    part = logits[:, rank * VOCAB // 2:(rank + 1) * VOCAB // 2].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(part, labels, group=dist.group.WORLD, backend=backend)
    (grad,) = torch.autograd.grad((loss * cotangent).sum(), part)
    torch.save({"loss": loss.detach(), "grad": grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_split_over_two_ranks(tmp_path, backend):
    mp.spawn(_split_worker, args=(free_port(), backend, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ref_loss, ref_grad = reference(*inputs())
    for r, res in enumerate(ranks):
        assert rel_err(res["loss"], ref_loss) < 1e-6
    assert rel_err(torch.cat([res["grad"] for res in ranks], 1), ref_grad) < 1e-6


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
