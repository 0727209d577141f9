"""DeepSpeed ZeRO as the optimizer of a megatron-core model driven by megatron's schedules.

Three things join the two libraries:

* `MegatronMPU` answers DeepSpeed's mpu questions from megatron's process groups, whose names differ
  (0.16 has no get_model_parallel_rank/world_size).
* Megatron's schedules call torch.autograd.backward themselves, not engine.backward. DeepSpeed
  (>= 0.17) hooks the output of engine.forward, so a plain backward still runs its prologue and
  epilogue; what it cannot know is which micro-batch ends the step. `accumulating` is megatron's
  `no_sync_func`: every micro-batch inside it is marked "not a boundary", and the last one, which
  megatron runs outside, is the boundary (ZeRO-2 reduces gradient buckets in its backward).
* Megatron already divides each micro-batch's loss by the micro-batch count, so DeepSpeed's own
  accumulation steps stay at 1 (it would divide again) and the boundary is set explicitly.
* Under ZeRO-1 the end-of-backward reduction is off; `finish_gradients` reduces once per step, after
  megatron's own gradient finalisation (tied embeddings across pipeline stages).

Gradients are summed in fp32 when training in bf16, over micro-batches and over data-parallel
ranks: each micro-batch's bf16 gradient is added once (after its backward) to an fp32 buffer, and
that buffer is what the data-parallel reduction, the clipping norm and AdamW read. DeepSpeed does
it by itself once the config asks for `grad_accum_dtype: fp32`: ZeRO-1 becomes its BF16_Optimizer
(full fp32 gradient buffer, fp32 masters and Adam state partitioned over data-parallel ranks), ZeRO-2
reduce-scatters each micro-batch's gradient in fp32 into this rank's fp32 partition. The reduction
itself is fp32 too (`communication_data_type`), at twice the bf16 traffic.
"""

from contextlib import contextmanager

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

from pretrain.config import TrainConfig


class MegatronMPU:
    """DeepSpeed's mpu interface over megatron's process groups (handed in, not looked up).

    DeepSpeed all-reduces the gradient norm over the model-parallel group and counts a parameter
    that is not tensor-parallel only on model-parallel rank 0. The group is megatron's TP x PP (each
    pipeline stage holds other parameters); the rank is the TP rank, so a parameter replicated over
    TP is counted once on every pipeline stage. Gradients of context-parallel ranks are summed with
    data parallelism (megatron's dp-cp group): ZeRO shards and reduces over DP x CP.
    """

    def __init__(self, groups):
        self.groups = groups

    def get_model_parallel_group(self):
        return self.groups.mp

    def get_model_parallel_rank(self):
        return self.groups.tp.rank()

    def get_model_parallel_world_size(self):
        return self.groups.tp.size()

    def get_tensor_model_parallel_group(self):
        return self.groups.tp

    def get_tensor_model_parallel_rank(self):
        return self.groups.tp.rank()

    def get_tensor_model_parallel_world_size(self):
        return self.groups.tp.size()

    def get_tensor_model_parallel_src_rank(self):
        return torch.distributed.get_global_rank(self.groups.tp, 0)

    def get_pipeline_model_parallel_group(self):
        return self.groups.pp

    def get_pipeline_model_parallel_rank(self):
        return self.groups.pp.rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.groups.pp.size()

    def get_data_parallel_group(self):
        return self.groups.dp_cp

    def get_data_parallel_rank(self):
        return self.groups.dp_cp.rank()

    def get_data_parallel_world_size(self):
        return self.groups.dp_cp.size()

    def get_data_parallel_group_ranks(self):
        return torch.distributed.get_process_group_ranks(self.groups.dp_cp)


def _uses_weight_decay(param: torch.nn.Parameter) -> bool:
    """Matrices decay; gates (A_log, dt_bias), norms and biases do not."""
    return param.ndim >= 2 and not getattr(param, "no_weight_decay", False)


def adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with a decayed and an undecayed group; megatron's scheduler reads `wd_mult`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if _uses_weight_decay(p) else no_decay).append(p)
    t = config.training
    return torch.optim.AdamW(
        [
            {"params": decay, "wd_mult": 1.0, "weight_decay": t.weight_decay},
            {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        fused=torch.cuda.is_available(),
    )


def deepspeed_config(config: TrainConfig, bf16: bool, data_parallel: int) -> dict:
    t = config.training
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.micro_batch_size * data_parallel,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "gradient_clipping": t.grad_clip,
        # torch's fused AdamW: no JIT build of DeepSpeed's own Adam on the GPU or CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def initialize(model: torch.nn.Module, config: TrainConfig, bf16: bool, groups):
    """The DeepSpeed engine around `model` (kla_megatron.ModelChunks), with ZeRO over megatron's DP x CP group.

    Under ZeRO-1 the engine does not reduce gradients at the end of a backward: megatron's pipeline schedules
    run the stages' last backward at different times, and the tied-embedding gradient must be summed over the
    first and last stage before ZeRO reads it; `finish_gradients` does both, once per step. ZeRO-2 (no pipeline)
    reduces gradient buckets inside every backward, as DeepSpeed does it."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=adamw(model, config),
        config=deepspeed_config(config, bf16, groups.dp_cp.size()),
        mpu=MegatronMPU(groups),
        dist_init_required=False,
    )
    engine.enable_backward_allreduce = engine.zero_optimization_partition_gradients()
    if groups.pp.size() > 1 and groups.pp.rank() == groups.pp.size() - 1:
        for chunk in model.chunks:  # the last stage's copy of a tied embedding: counted once in the clipping norm
            if chunk.post_process and chunk.share_embeddings_and_output_weights:
                chunk.shared_embedding_or_output_weight().ds_pipe_replicated = True
    return engine


def finish_gradients(engine, groups) -> None:
    """After the step's last backward: megatron's gradient finalisation that DeepSpeed knows nothing of (the
    word embedding tied to the output layer, summed over the first and last pipeline stage), then ZeRO's
    reduction over DP x CP. Sequence-parallel norm weights need nothing here: their gradient is summed over
    TP inside the backward (kla_megatron.norms)."""
    chunks = engine.module.chunks
    holder = chunks[0] if chunks[0].pre_process else chunks[-1]
    tied_across_stages = holder.share_embeddings_and_output_weights and groups.embd is not None and \
        groups.embd.size() > 1 and torch.distributed.get_rank() in torch.distributed.get_process_group_ranks(groups.embd)
    if tied_across_stages:
        weight = holder.shared_embedding_or_output_weight()
        grad = safe_get_full_grad(weight)
        torch.distributed.all_reduce(grad, group=groups.embd)
        if getattr(weight, "_hp_grad", None) is not None:  # BF16_Optimizer's fp32 accumulation buffer
            weight.set_full_hp_grad(grad)
        else:
            safe_set_full_grad(weight, grad)
    if not engine.enable_backward_allreduce:
        engine.allreduce_gradients()


def optimizer_state_bytes(engine) -> int:
    """Bytes of the fp32 master weights and AdamW state this rank holds (after a step): the part of
    the training state ZeRO divides by the data-parallel size."""
    adam = engine.optimizer.optimizer
    partitions = [p for group in adam.param_groups for p in group["params"]]
    state = [t for s in adam.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
    return sum(t.numel() * t.element_size() for t in partitions + state)


@contextmanager
def accumulating(engine):
    """Megatron's no_sync_func: micro-batches run inside are not the step's last."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)
