"""pretrain.profiling's summary of a GPU trace: time per component (backward kernels to their forward op's component
by sequence number), the costliest kernels of each, GPU busy time. The trace is made of torch.profiler's own event
class, with kernels attached to their ops as the profiler attaches them (the profiler itself needs a GPU for kernels:
bench/pretrain.py --profile-steps runs it there)."""

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from pretrain.profiling import format_table, summarize


def step():
    """One step (microseconds): the MLP's matmul (two kernels, 0-300), the optimizer's kernel (400-500), the matmul's
    backward (550-750), which belongs to the MLP by its sequence number, and a memset of no op (750-760). Each kernel
comes with the runtime call that launched it."""
    events = []

    def op(name, start, end, parent=None, sequence_nr=-1, kernels=()):
        event = FunctionEvent(id=len(events), name=name, thread=0, start_us=start, end_us=end, sequence_nr=sequence_nr)
        if parent is not None:
            event.set_cpu_parent(parent)
        for kernel, k_start, k_end in kernels:
            event.append_kernel(kernel, 0, k_end - k_start)
            # The runtime call that launched the kernel shares its correlation id.
            launch = FunctionEvent(id=1000 + len(events), name="cudaLaunchKernel", thread=0, start_us=start,
                                   end_us=start + 1)
            launch.set_cpu_parent(event)
            events.append(launch)
            events.append(FunctionEvent(id=launch.id, name=kernel, thread=0, start_us=k_start, end_us=k_end,
                                        device_type=DeviceType.CUDA))
        events.append(event)
        return event

    op("aten::mm", 1, 40, parent=op("component::MLP", 0, 50), sequence_nr=7,
       kernels=[("gemm_a", 0, 200), ("gemm_b", 200, 300)])
    op("aten::_fused_adamw_", 360, 390, parent=op("component::optimizer step (ZeRO, Adam)", 350, 400),
       kernels=[("adam", 400, 500)])
    op("aten::mm", 530, 550, parent=op("autograd::engine::evaluate_function: MmBackward0", 520, 560, sequence_nr=7),
       kernels=[("gemm_bwd", 550, 750)])
    events.append(FunctionEvent(id=len(events), name="Memset (Device)", thread=0, start_us=750, end_us=760,
                                device_type=DeviceType.CUDA))
    return events


def test_components_and_their_kernels():
    summary = summarize(step(), steps=1, device="a GPU")
    assert summary["components_ms_per_step"] == {"MLP": 0.3, "MLP (bwd)": 0.2, "optimizer step (ZeRO, Adam)": 0.1}
    assert summary["top_kernels_ms_per_step"] == {"MLP": {"gemm_a": 0.2, "gemm_b": 0.1}, "MLP (bwd)": {"gemm_bwd": 0.2},
                                                  "optimizer step (ZeRO, Adam)": {"adam": 0.1}}
    assert summary["gpu_busy_ms_per_step"] == pytest.approx(0.61)  # the memset counts as busy
    assert summary["wall_ms_per_step"] == pytest.approx(0.56)  # the CPU events span 0 .. 560 us
    table = format_table(summary).splitlines()
    assert table.index("| MLP | 0.30 |") + 1 == table.index("| &nbsp;&nbsp;`gemm_a` | 0.20 |")


def test_gpu_idle_and_host_waits_by_op():
    """The GPU idles 100 us before the optimizer's kernel and 50 before the backward matmul's; the host then waits
    85 us in a stream synchronisation inside an .item() outside any component."""
    events = step()
    item = FunctionEvent(id=2000, name="aten::_local_scalar_dense", thread=0, start_us=800, end_us=900)
    sync = FunctionEvent(id=2001, name="cudaStreamSynchronize", thread=0, start_us=805, end_us=890)
    sync.set_cpu_parent(item)
    summary = summarize(events + [item, sync], steps=1, device="a GPU")
    assert summary["gpu_idle_before_ms_per_step"] == {"optimizer step (ZeRO, Adam): aten::_fused_adamw_": 0.1,
                                                      "MLP (bwd): aten::mm": 0.05}
    assert summary["host_waits_ms_per_step"] == {"no component: aten::_local_scalar_dense": 0.085}
    table = format_table(summary).splitlines()
    assert table.index("| GPU idle, by the op launched next | ms per step |") + 3 == \
        table.index("| MLP (bwd): aten::mm | 0.05 |")
