"""data.reset_state_at_eod: a micro-batch whose samples hold several EOD-terminated documents, packed by
pretrain.data.model_inputs (megatron's THD format), gives every token the loss it has when its document runs
alone: no conv tap, recurrent state or attention crosses a document start. KLA, and a hybrid with softmax
attention (RoPE positions restart per document too)."""

from dataclasses import replace

import pytest
import torch

from kla_model_testing import megatron_world, rel_err

VOCAB, EOD, SEQ = 256, 7, 40
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def world():
    with megatron_world(tensor_parallel=1):
        yield


def build(hybrid: bool):
    from kla_megatron import build_model, named_model, transformer_config

    model_config = named_model("tiny")
    if hybrid:
        model_config = replace(model_config, attention_every=2)
    torch.manual_seed(0)
    return build_model(model_config, transformer_config(model_config, use_cpu_initialization=True), VOCAB, SEQ)


def sample(gen, lengths):
    """One sample of documents of the given lengths, each ending in EOD; position ids restart after an EOD."""
    tokens = torch.randint(8, VOCAB, (SEQ + 1,), generator=gen)
    position_ids, start = torch.empty(SEQ, dtype=torch.long), 0
    for length in lengths:
        tokens[start + length - 1] = EOD
        position_ids[start:start + length] = torch.arange(length)
        start += length
    return tokens, position_ids


@pytest.mark.parametrize("hybrid", [False, True], ids=["kla", "hybrid"])
def test_packed_documents_equal_separate_documents(hybrid):
    from pretrain.cpu import cuda_bookkeeping_on_cpu

    with cuda_bookkeeping_on_cpu():  # megatron's RoPE moves its frequencies to "cuda"
        check_packed_documents(hybrid)


def check_packed_documents(hybrid):
    from pretrain.data import model_inputs

    model = build(hybrid)
    gen = torch.Generator().manual_seed(1)
    layouts = [[3, 20, 1, 16], [40]]  # a one-token document, and a sample that is one document
    samples = [sample(gen, lengths) for lengths in layouts]
    batch = {"tokens": torch.stack([t[:-1] for t, _ in samples]), "labels": torch.stack([t[1:] for t, _ in samples]),
             "loss_mask": torch.ones(2, SEQ), "position_ids": torch.stack([p for _, p in samples])}
    inputs, params = model_inputs(batch, packed=True)
    assert inputs["tokens"].shape == (1, 2 * SEQ) and params.cu_seqlens_q.tolist() == [0, 3, 23, 24, 40, 80]
    packed = model(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"], packed_seq_params=params)

    separate = []
    for row, lengths in enumerate(layouts):
        start = 0
        for length in lengths:
            part = slice(start, start + length)
            separate.append(model(batch["tokens"][row:row + 1, part], batch["position_ids"][row:row + 1, part], None,
                                  labels=batch["labels"][row:row + 1, part]))
            start += length
    reference = torch.cat(separate, dim=1)
    assert rel_err(packed, reference) < TOL
    unpacked = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).reshape(1, -1)
    assert rel_err(unpacked, reference) > 1e-3, "the documents influence each other without packing: the test has teeth"
