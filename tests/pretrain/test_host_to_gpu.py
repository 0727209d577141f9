"""A micro-batch reaches the GPU without the host waiting for the work queued there (pretrain.train.to_device):
otherwise the GPU idles at every micro-batch while the host launches its first kernels."""

import pytest
import torch

from pretrain.train import to_device

SLEEP_CYCLES = 2_000_000_000  # about a second of GPU work queued ahead of the copies


def micro_batch():
    """A micro-batch as the trainer copies it: four [4, 4096] int64 tensors."""
    tokens = torch.arange(4 * 4097).reshape(4, 4097)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(4, 4096, dtype=torch.int64),
            "position_ids": torch.arange(4096).repeat(4, 1)}


@pytest.mark.gpu
def test_copy_does_not_wait_for_queued_gpu_work():
    batch = micro_batch()
    stream = torch.cuda.current_stream()
    # The premise: from pageable memory, the copies return only once the queued work is done.
    torch.cuda._sleep(SLEEP_CYCLES)
    for value in batch.values():
        value.to("cuda", non_blocking=True)
    assert stream.query(), "copies from pageable memory no longer wait for the GPU; this test proves nothing"
    for value in batch.values():  # allocates page-locked blocks, which later micro-batches reuse
        to_device(value)
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    on_gpu = {key: to_device(value) for key, value in batch.items()}
    assert not stream.query(), "to_device waited for the GPU's queued work"
    assert all(on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value) for key, value in batch.items())
