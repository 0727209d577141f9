"""The console line: tokens/s averaged over the logging interval (steps only, not validation or
checkpoints) and an ETA from the whole run so far, so one slow or fast step does not swing them."""

import re

import pytest

from pretrain import metrics
from pretrain.metrics import Metrics


class Clock:
    """perf_counter for the test: advances only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    return clock


def console_line(capsys) -> dict:
    line = capsys.readouterr().out.strip().splitlines()[-1]
    tokens_per_s = float(re.search(r"\| ([\d,]+) tok/s", line).group(1).replace(",", ""))
    h, m, s = map(int, re.search(r"ETA (\d+):(\d\d):(\d\d)", line).group(1, 2, 3))
    return {"tokens_per_s": tokens_per_s, "eta": 3600 * h + 60 * m + s, "line": line}


def test_tokens_per_s_is_the_interval_mean_and_eta_the_run_so_far(clock, capsys):
    m = Metrics(None, total_steps=100, tokens_per_step=1000, flops_per_token=1.0, world_size=1)
    m.start()
    for step, seconds in enumerate([1.0, 1.0, 1.0, 5.0], start=1):  # the 4th step is slow
        clock.now += seconds
        m.train(step, loss=5.0, lr=1e-3, grad_norm=1.0, log=step == 4)
    line = console_line(capsys)
    assert line["tokens_per_s"] == 4 * 1000 / 8  # not 1000 / 5, the last step's
    assert line["eta"] == 8 / 4 * 96

    clock.now += 30.0  # a validation: not a step, but part of the run's wall time
    m.validation(4, 4.9)
    for step in range(5, 9):  # four fast steps
        clock.now += 0.5
        m.train(step, loss=5.0, lr=1e-3, grad_norm=1.0, log=step == 8)
    line = console_line(capsys)
    assert line["tokens_per_s"] == 4 * 1000 / 2
    assert line["eta"] == (8 + 30 + 2) / 8 * 92


def test_a_checkpoint_is_not_counted_as_a_step(clock, capsys):
    m = Metrics(None, total_steps=10, tokens_per_step=1000, flops_per_token=1.0, world_size=1, start_step=4)
    m.start()
    clock.now += 2.0
    m.train(5, loss=5.0, lr=1e-3, grad_norm=1.0, log=False)
    clock.now += 60.0  # saving a checkpoint
    m.start()
    clock.now += 2.0
    m.train(6, loss=5.0, lr=1e-3, grad_norm=1.0, log=True)
    line = console_line(capsys)
    assert line["tokens_per_s"] == 2 * 1000 / 4
    assert line["eta"] == 64 / 2 * 4  # the run so far, since step 4


def test_tflops_only_on_a_gpu(clock, capsys, monkeypatch):
    m = Metrics(None, total_steps=10, tokens_per_step=1000, flops_per_token=1e9, world_size=1)
    m.start()
    clock.now += 1.0
    m.train(1, loss=5.0, lr=1e-3, grad_norm=1.0, log=True)
    line = console_line(capsys)["line"]
    assert ("TFLOP/s/gpu" in line) == metrics.torch.cuda.is_available(), line
