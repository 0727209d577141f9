"""Where a training step's time goes: torch.profiler over a few steps, GPU time summed per model component.

    logging.profile_steps=[10, 13]   # profile steps 10, 11 and 12; writes OUTPUT_DIR/profile/step_profile.json

Forward time is attributed by named ranges that module hooks open around the parts of each layer (norms,
projections, the mixer, attention, MLP, embedding, output layer, loss) and around the optimizer step and the data
fetch; the mixer labels its own stages (conv, gates, recurrence, norm and gate). A backward op carries the
sequence number of the forward op it differentiates, so its kernels go to that op's component too. What the GPU
does not cover of the wall time is host overhead: Python, launches, synchronisations. The costliest kernels of
every component are listed by name.

The host overhead is broken down two ways. Every idle stretch of the GPU is charged to the op whose kernel ended it
(the GPU was waiting for the host to launch that kernel), found through the CUDA runtime call that launched it
(kernel and launch share a correlation id). And the time the host spent blocked in CUDA synchronisations and copies
is listed by the op that made them (`.item()` shows as aten::_local_scalar_dense, a copy to the GPU as aten::copy_).
"""

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

# Module name suffix (the last part of its qualified name) -> component. Looked up innermost first.
MODULE_COMPONENTS = {
    "embedding": "embedding",
    "input_layernorm": "norms (layer)",
    "pre_mlp_layernorm": "norms (layer)",
    "final_layernorm": "norms (layer)",
    "in_proj": "projections (mixer/attention)",
    "out_proj": "projections (mixer/attention)",
    "linear_qkv": "projections (mixer/attention)",
    "linear_proj": "projections (mixer/attention)",
    "core_attention": "attention core",
    "self_attention": "mixer: other (copies, gates)",
    "mlp": "MLP",
    "output_layer": "output layer",
}
TOP_KERNELS = 6  # the costliest GPU kernels listed per component
TOP_HOST = 10  # the ops listed for GPU idle time and for host waits
# CUDA runtime calls in which the host waits for the GPU (a copy from or to pageable memory waits for the stream).
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")
KERNEL_NAME_CHARS = 120
LOSS = "loss"
OPTIMIZER = "optimizer step (ZeRO, Adam)"
DATA = "data loading"
GRAD_ACCUMULATION = "gradient accumulation hooks"


def component_range(name: str):
    """A profiler range for code that labels its own stages (the mixer's conv, recurrence, ...)."""
    return torch.profiler.record_function(f"component::{name}")


class StepProfiler:
    """Profiles steps [first, last) of a run; `summary()` afterwards gives milliseconds per component and step."""

    def __init__(self, model: torch.nn.Module, first: int, last: int, out_dir: Path):
        self.first, self.last, self.out_dir = first, last, out_dir
        self.model = model
        self.profiler = None
        self._handles = []
        self._open = []

    def wants(self, step: int) -> bool:
        return self.first <= step < self.last

    def step_begin(self, step: int) -> None:
        if step != self.first:
            return
        self._install_hooks()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
        self.profiler.__enter__()

    def step_end(self, step: int):
        """After step `step` (1-based count of finished steps); returns the summary when profiling ends."""
        if self.profiler is None or step != self.last:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        summary = summarize(self.profiler.events(), self.last - self.first)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "step_profile.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.profiler = None
        return summary

    def _install_hooks(self):
        for name, module in self.model.named_modules():
            component = MODULE_COMPONENTS.get(name.rsplit(".", 1)[-1])
            if component is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(component)))
            self._handles.append(module.register_forward_hook(self._exit(component)))
            if component == "output layer":  # megatron computes the loss right after, outside any module
                self._handles.append(module.register_forward_hook(self._enter(LOSS)))
        self._handles.append(self.model.register_forward_hook(self._exit_loss))

    def _enter(self, component):
        def hook(module, *args):
            scope = component_range(component)
            scope.__enter__()
            self._open.append((component, scope))
        return hook

    def _exit(self, component):
        def hook(module, *args):
            while self._open:
                name, scope = self._open.pop()
                scope.__exit__(None, None, None)
                if name == component:
                    break
        return hook

    def _exit_loss(self, module, *args):
        if self._open and self._open[-1][0] == LOSS:
            self._open.pop()[1].__exit__(None, None, None)


def _component_of(event, by_sequence):
    """The innermost labelled range around a CPU event, or, in backward, the component of its forward op."""
    node = event
    while node is not None:
        if node.name.startswith("component::"):
            return node.name[len("component::"):]
        if node.name.startswith("autograd::engine::evaluate_function:"):
            if "AccumulateGrad" in node.name:
                return GRAD_ACCUMULATION
            forward = by_sequence.get(node.sequence_nr)
            return f"{forward} (bwd)" if forward else "backward: other"
        node = node.cpu_parent
    return None


def _kernel_component(name: str):
    """Kernels that say what they are, wherever they run from."""
    if "nccl" in name.lower():
        return "communication (NCCL)"
    if name.startswith("chunk_kla") or name.startswith("chunk_gated"):
        return "recurrence kernels"
    return None


def _op_label(runtime_call, by_sequence) -> str:
    """'component: op' for a CUDA runtime call: the component around it and the op that made it."""
    op = runtime_call.cpu_parent
    component = _component_of(runtime_call, by_sequence) or "no component"
    return f"{component}: {op.name if op is not None else runtime_call.name}"


def _per_step_top(totals: dict, steps: int) -> dict:
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_HOST]
    return {name: round(us / 1e3 / steps, 3) for name, us in top}


def host_time(cpu, device_events, by_sequence, steps: int) -> dict:
    """GPU idle time by the op whose kernel ended the idle stretch, and host time blocked in CUDA waits by the op
    that waited, in milliseconds per step (the largest TOP_HOST of each)."""
    launches = {e.id: e for e in cpu if e.name.startswith("cu")}  # runtime calls (cuda*, cu* of the driver)
    idle, end = defaultdict(float), None
    for kernel in sorted(device_events, key=lambda e: e.time_range.start):
        if end is not None and kernel.time_range.start > end:
            launch = launches.get(kernel.id)
            idle[_op_label(launch, by_sequence) if launch else "unknown launch"] += kernel.time_range.start - end
        end = kernel.time_range.end if end is None else max(end, kernel.time_range.end)
    waits = defaultdict(float)
    for e in cpu:
        if e.name in HOST_WAITS:
            waits[_op_label(e, by_sequence)] += e.time_range.end - e.time_range.start
    return {"gpu_idle_before_ms_per_step": _per_step_top(idle, steps), "host_waits_ms_per_step": _per_step_top(waits, steps)}


def summarize(events, steps: int, device: str = None) -> dict:
    """Milliseconds per step: GPU kernel time per component (CPU time of the ops on a CPU-only run), GPU busy
    time, and the wall time of the steps. device: the name to record (default: the GPU's, or "cpu")."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    by_sequence = {}
    # Forward ops -> their component, by sequence number. Ops that record no autograd node (a copy of the data,
    # a composite wrapper) carry the number of the next node too; the op that does record it comes last.
    for e in sorted(cpu, key=lambda e: e.time_range.start):
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and "Backward" not in e.name:
            component = _component_of(e, {})
            if component is not None:
                by_sequence[e.sequence_nr] = component
    per_component = defaultdict(float)
    per_kernel = defaultdict(lambda: defaultdict(float))  # component -> kernel name -> time
    on_gpu = any(e.device_type == DeviceType.CUDA for e in events)
    for e in cpu:
        if on_gpu:
            for kernel in e.kernels:
                component = _kernel_component(kernel.name) or _component_of(e, by_sequence) or "other"
                per_component[component] += kernel.duration
                per_kernel[component][kernel.name[:KERNEL_NAME_CHARS]] += kernel.duration
        elif e.self_cpu_time_total > 0:  # a CPU-only run: where the processor's time goes, by the same rules
            per_component[_component_of(e, by_sequence) or "other"] += e.self_cpu_time_total
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    busy, end = 0.0, float("-inf")
    for start, stop in kernels:  # union of kernel intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    wall = (max(e.time_range.end for e in cpu) - min(e.time_range.start for e in cpu)) if cpu else 0.0
    components = {name: round(us / 1e3 / steps, 3) for name, us in sorted(per_component.items(), key=lambda kv: -kv[1])}
    top_kernels = {name: {kernel: round(us / 1e3 / steps, 3)
                          for kernel, us in sorted(per_kernel[name].items(), key=lambda kv: -kv[1])[:TOP_KERNELS]}
                   for name in components if per_kernel[name]}
    return {
        "device": device or (torch.cuda.get_device_name() if on_gpu else "cpu"),
        "steps": steps,
        "wall_ms_per_step": round(wall / 1e3 / steps, 3),
        "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 3),
        "host_overhead_ms_per_step": round((wall - busy) / 1e3 / steps, 3),
        "components_ms_per_step": components,
        "top_kernels_ms_per_step": top_kernels,
        **(host_time(cpu, device_events, by_sequence, steps) if on_gpu else {}),
    }


def format_table(summary: dict) -> str:
    """The components, each followed by its costliest kernels (GPU runs)."""
    unit = "CPU" if summary["device"] == "cpu" else "GPU"
    rows = [f"| component | {unit} ms per step |", "|---|---|"]
    for name, ms in summary["components_ms_per_step"].items():
        rows.append(f"| {name} | {ms:.2f} |")
        rows += [f"| &nbsp;&nbsp;`{kernel}` | {k_ms:.2f} |"
                 for kernel, k_ms in summary.get("top_kernels_ms_per_step", {}).get(name, {}).items()]
    rows += [
        f"| **GPU busy (union of kernels)** | {summary['gpu_busy_ms_per_step']:.2f} |",
        f"| **host overhead and syncs (wall - busy)** | {summary['host_overhead_ms_per_step']:.2f} |",
        f"| **wall time per step** | {summary['wall_ms_per_step']:.2f} |",
    ]
    for key, title in (("gpu_idle_before_ms_per_step", "GPU idle, by the op launched next"),
                       ("host_waits_ms_per_step", "host blocked in CUDA waits, by the op")):
        if summary.get(key):
            rows += ["", f"| {title} | ms per step |", "|---|---|"]
            rows += [f"| {name} | {ms:.2f} |" for name, ms in summary[key].items()]
    return "\n".join(rows)
