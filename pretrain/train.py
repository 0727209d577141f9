"""The training program: config -> checks -> distributed start -> model -> DeepSpeed ZeRO -> data ->
megatron's schedule, step after step -> validation, TensorBoard, checkpoints.

    python -m pretrain --config configs/tiny.toml [--resume] [section.key=value ...]

Launch with torchrun, srun or mpiexec for several processes; alone it runs as one process.
"""

import argparse
import itertools
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch._inductor.config
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from kla_megatron import build_model_chunks, transformer_config
from kla_megatron.init import initialize_weights
from kla_megatron.config import ModelConfig
from kla_megatron.mixer_math import MixerShape
from pretrain import checkpoint, profiling, zero
from pretrain.config import ConfigError, TrainConfig, config_toml, describe_keys, load_config, save_config
from pretrain.cpu import cuda_bookkeeping_on_cpu
from pretrain.data import DataFiles, MicroBatches, build_datasets, load_tokenizer, model_inputs
from pretrain.distributed import init_distributed, launch_env, shutdown
from pretrain.history import History
from pretrain.layout import ParallelLayout
from pretrain.metrics import Metrics, model_flops_per_token
from pretrain.profiling import StepProfiler, component_range
from pretrain.resume import check_resume
from pretrain.run_log import log_to_file

# megatron's OptimizerParamScheduler styles that need no settings of their own (WSD needs several).
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")


def check_config(config: TrainConfig, world_size: int, gpus: Optional[bool] = None) -> tuple[ModelConfig, ParallelLayout, DataFiles]:
    """Every check that needs no process group or GPU: bad input stops here, with its fix. `gpus`: whether
    the run will have GPUs (default: whether this machine has one; a login node checks for its GPU nodes)."""
    model = config.model.resolve()
    p, t, d = config.parallel, config.training, config.data
    cuda = torch.cuda.is_available() if gpus is None else gpus
    layout = ParallelLayout.build(p, model, world_size, cuda, d.seq_length)
    if p.data and layout.data != p.data:
        raise ConfigError(
            f"{world_size} process(es) give data-parallel size {layout.data}, but the layout is tensor={p.tensor} x "
            f"pipeline={p.pipeline} x context={p.context} x data={p.data} = {p.tensor * p.pipeline * p.context * p.data} "
            f"GPUs; launch that many (one per GPU) or set parallel.data"
        )
    if t.global_batch_size % (t.micro_batch_size * layout.data):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({layout.data})"
        )
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.data)
    # megatron's interleaved schedule runs the micro-batches in groups of parallel.pipeline through each chunk.
    if layout.virtual_pipeline > 1 and micro_batches % layout.pipeline:
        raise ConfigError(
            f"the interleaved pipeline schedule needs a multiple of parallel.pipeline={layout.pipeline} micro-batches "
            f"per step, got {micro_batches} (global_batch_size / (micro_batch_size x data-parallel size)); change "
            f"training.global_batch_size or micro_batch_size, or set parallel.virtual_pipeline=1"
        )
    if any(model.layer_mixer(i) != "attention" for i in range(1, model.num_layers + 1)):
        # The Triton kernels of the mixer address a micro-batch's [tokens, width] tensors with 32-bit offsets;
        # the widest is this rank's input projection.
        tokens = t.micro_batch_size * d.seq_length // layout.context
        width = sum(MixerShape(model.num_heads // layout.tensor, model.key_head_dim, model.value_head_dim).projection_split)
        if tokens * width >= 2**31:
            raise ConfigError(
                f"{tokens} tokens per micro-batch and rank x the mixer's {width}-wide input projection exceed the "
                f"kernels' 32-bit offsets (2^31 elements); lower training.micro_batch_size or data.seq_length, or "
                f"raise parallel.context (at most {(2**31 - 1) // width} tokens per rank)"
            )
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"training.precision must be auto, bf16 or fp32, got {t.precision!r}")
    if t.recompute and not cuda:
        raise ConfigError("training.recompute needs a GPU (megatron's activation recompute saves CUDA RNG states); set it to false")
    if t.recompute_modules and not cuda:
        raise ConfigError("training.recompute_modules needs a GPU (megatron's selective recompute saves CUDA RNG states); set it to []")
    if model.kernel_backend == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.kernel_backend=triton needs a GPU (or TRITON_INTERPRET=1, slow, for tests); use auto or torch on CPU")
    if not 0 <= t.warmup_steps < t.steps:
        raise ConfigError(
            f"training.warmup_steps={t.warmup_steps} must be in [0, training.steps={t.steps}); lower it or raise training.steps"
        )
    if t.lr_decay_style not in LR_DECAY_STYLES:
        raise ConfigError(f"training.lr_decay_style must be one of {', '.join(LR_DECAY_STYLES)}, got {t.lr_decay_style!r}")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"training.min_lr={t.min_lr} must be in [0, training.lr={t.lr}]")
    profile = config.logging.profile_steps
    if profile and not (len(profile) == 2 and 0 <= profile[0] < profile[1] <= t.steps):
        raise ConfigError(f"logging.profile_steps={profile} must be [first, last) with 0 <= first < last <= training.steps, e.g. [10, 13]")
    init_from = config.checkpoint.init_from
    if init_from and not checkpoint.is_checkpoint(Path(init_from)):
        raise ConfigError(f"checkpoint.init_from={init_from} is not a checkpoint folder (e.g. outputs/run/checkpoints/step_0000100)")
    files = DataFiles.resolve(d)
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); choose a directory you can write to") from None
    if torch.cuda.is_available() and not p.force_layout:
        from pretrain.estimate import check_fits

        device = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        gpu = torch.cuda.get_device_properties(device)
        check_fits(config, world_size, load_tokenizer(files.tokenizer).vocab_size, gpu.total_memory, gpu.name)
    return model, layout, files


def forward_step(engine, groups, packed, data_iterator, model):
    """One micro-batch through one model chunk; megatron's schedule calls this and then backward.

    The schedule is handed the bare megatron chunks (it reads their config and, with pipelining, sets
    their input tensor); the forward itself goes through the DeepSpeed engine, whose output hooks
    run ZeRO's backward bookkeeping when the schedule calls torch.autograd.backward."""
    with component_range(profiling.DATA):
        batch, packed_seq_params = model_inputs(next(data_iterator), packed=packed, cp_rank=groups.cp.rank(),
                                                cp_size=groups.cp.size())
        batch = {k: to_device(v) for k, v in batch.items()}
        if packed_seq_params is not None:
            packed_seq_params.cu_seqlens_q = packed_seq_params.cu_seqlens_kv = to_device(packed_seq_params.cu_seqlens_q)
    chunk = next(i for i, c in enumerate(engine.module.chunks) if c is model)
    per_token_loss = engine(chunk, batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                            packed_seq_params=packed_seq_params)
    return per_token_loss, partial(masked_mean, batch["loss_mask"], groups.cp)


def to_device(host: torch.Tensor) -> torch.Tensor:
    """A micro-batch's tensor on the GPU, copied asynchronously from page-locked memory. From pageable memory CUDA
    may first wait for the work queued on the GPU (a micro-batch's four copies did, on an H200), which then idles
    while the host launches the next kernels."""
    if not torch.cuda.is_available():
        return host
    return host.contiguous().pin_memory().to(torch.cuda.current_device(), non_blocking=True)


def masked_mean(loss_mask, cp_group, per_token_loss):
    """The mean loss over the whole sequence's unmasked tokens. A context-parallel rank sums its slice over the
    whole sequence's count and scales by the CP size: ZeRO averages gradients over DP x CP, where the slices'
    gradients must add up."""
    mask = loss_mask.float()
    count = mask.sum()
    if cp_group.size() > 1:
        torch.distributed.all_reduce(count, group=cp_group)
    loss = (per_token_loss.float() * mask).sum() / count.clamp(min=1) * cp_group.size()
    # A copy: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"loss": loss.detach().clone()}


def mean_loss(losses: list, groups) -> float:
    """Mean over micro-batches and data-parallel ranks (on the last pipeline stage; 0 elsewhere)."""
    if not losses:
        return 0.0
    value = torch.stack([x["loss"] for x in losses]).mean()
    dist.all_reduce(value, group=groups.dp_cp)  # CP ranks hold CP-scaled parts of each sequence's loss
    return value.item() / groups.dp_cp.size()


class StopSignal:
    """SIGTERM or SIGUSR1 (Slurm's warning before the time limit, or a requeue) asks the run to
    checkpoint at the end of the current step and stop; ranks agree on it with one all-reduce a step."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        # Slurm and `timeout` signal every process of the job, torch.compile's compile workers too (megatron's
        # fused SwiGLU). A worker that dies mid-compilation leaves torch waiting for it forever (pytorch #189290),
        # so the run could not stop; compiling in this process, the signal only sets the flag.
        torch._inductor.config.compile_threads = 1

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([int(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def seed_everything(seed: int) -> None:
    """torch's generators and, on a GPU, megatron's CUDA RNG tracker, which its layers draw from there."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def is_reporting_rank(groups) -> bool:
    """The rank that logs: the last pipeline stage's first tensor-, context- and data-parallel rank."""
    return groups.pp.rank() == groups.pp.size() - 1 and groups.dp_cp.rank() == 0 and groups.tp.rank() == 0


def run(config: TrainConfig, resume: bool) -> History:
    stop = StopSignal()  # first: a signal during start-up is honoured after the first step
    env = launch_env()
    model_config, layout, files = check_config(config, env.world_size)
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    if not resume and checkpoint.latest_checkpoint(ckpt_root) is not None:
        raise ConfigError(f"{ckpt_root} already holds a checkpoint; pass --resume to continue it, or use a new output_dir")

    t = config.training
    latest = checkpoint.latest_checkpoint(ckpt_root) if resume else None
    saved_step, notes = check_resume(latest, model_config, t) if latest is not None else (0, [])
    if saved_step >= t.steps:
        if env.rank == 0:
            print(f"nothing to do: {latest} is step {saved_step} and training.steps={t.steps}; raise training.steps to train further", flush=True)
        return History()
    groups = init_distributed(env, layout)
    rank0 = dist.get_rank() == 0
    reporting = is_reporting_rank(groups)
    if rank0 or reporting:
        log_to_file(out / ("train.log" if rank0 else f"train_rank{dist.get_rank()}.log"))
    for note in notes if rank0 else ():
        print(f"note: {note}", flush=True)
    dp_rank, dp_size = groups.dp.rank(), groups.dp.size()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp_size)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())
    seed_everything(t.seed)

    tokenizer = load_tokenizer(files.tokenizer)
    tf_config = transformer_config(
        model_config,
        tensor_parallel=layout.tensor,
        pipeline_parallel=layout.pipeline,
        virtual_pipeline=layout.virtual_pipeline,
        pipeline_layout=layout.megatron_pipeline_layout(),
        context_parallel=layout.context,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute=t.recompute,
        recompute_modules=tuple(t.recompute_modules),
    )
    with cuda_bookkeeping_on_cpu():
        model = build_model_chunks(model_config, tf_config, tokenizer.vocab_size, config.data.seq_length, groups)
    start_weights = latest or (Path(config.checkpoint.init_from) if config.checkpoint.init_from else None)
    # Before DeepSpeed takes its fp32 master copy of the weights (a resume sets the masters from the checkpoint).
    if latest is None and start_weights is not None:
        checkpoint.load_model(start_weights, model)
    elif latest is None:
        initialize_weights(model, tf_config, t.seed)  # the same model at every parallel layout
    engine = zero.initialize(model, config, bf16, groups)
    tf_config.no_sync_func = partial(zero.accumulating, engine)
    scheduler = OptimizerParamScheduler(
        engine.optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )

    train_ds, valid_ds = build_datasets(
        files, tokenizer, config.data.seq_length, t.seed,
        train_samples=t.steps * t.global_batch_size,
        # Every validation reads the same eval.iters global batches.
        valid_samples=config.eval.iters * t.global_batch_size if config.eval.interval else 0,
        cache_dir=str(out / "data_cache"),
        reset_at_eod=config.data.reset_state_at_eod,
    )
    step, consumed = 0, 0
    if latest is not None:
        state = checkpoint.load_training_state(latest, engine, config.checkpoint.load_optimizer, layout.as_dict())
        step, consumed = state["step"], state["consumed_samples"]
        scheduler.load_state_dict(state["scheduler"])
        if rank0:
            print(f"resumed from {latest} at step {step} ({consumed} samples consumed)", flush=True)
    elif start_weights is not None and rank0:
        print(f"initialised the model from {start_weights}", flush=True)
    elif resume and rank0:
        print(f"--resume: no checkpoint under {ckpt_root}, starting from scratch", flush=True)
    batches = MicroBatches(train_ds, t.micro_batch_size, dp_rank, dp_size, consumed)
    history_path = out / f"history_rank{dist.get_rank()}.json"
    history = History.resume(history_path, step) if latest is not None else History()

    tokens_per_step = t.global_batch_size * config.data.seq_length
    metrics = Metrics(
        out / "tb" if reporting and config.logging.tensorboard else None,
        t.steps,
        tokens_per_step,
        model_flops_per_token(model_config, tokenizer.vocab_size, config.data.seq_length),
        env.world_size,
        step,
    )
    n_params = sum(x.numel() for x in model.parameters())
    trained = f"{config.model.name} ({model_config.mixer}, {n_params / 1e6:.1f}M parameters on rank 0)"
    if rank0:
        save_config(config, out / "config.json")
        print(
            f"training {trained} | "
            f"{env.world_size} process(es) ({env.launcher}): {layout.describe()}, "
            f"{'bf16' if bf16 else 'fp32'} on {'cuda' if torch.cuda.is_available() else 'cpu'} | "
            f"{num_microbatches} micro-batches x {t.micro_batch_size} x {config.data.seq_length} tokens per rank "
            f"({tokens_per_step} tokens a step) | outputs in {out}",
            flush=True,
        )

    forward_backward = get_forward_backward_func()
    packed = config.data.reset_state_at_eod
    chunks = len(engine.module.chunks)

    def per_chunk(micro_batches):
        """The interleaved schedule reads one iterator per model chunk: each sees every micro-batch."""
        return list(itertools.tee(micro_batches, chunks)) if chunks > 1 else micro_batches

    schedule = partial(
        forward_backward,
        forward_step_func=partial(forward_step, engine, groups, packed),
        model=list(engine.module.chunks),
        num_microbatches=num_microbatches,
        # the activations' shape between pipeline stages: packed samples travel as one row
        seq_length=config.data.seq_length // layout.context * (t.micro_batch_size if packed else 1),
        micro_batch_size=1 if packed else t.micro_batch_size,
    )

    def validate() -> float:
        engine.eval()
        valid = MicroBatches(valid_ds, t.micro_batch_size, dp_rank, dp_size)
        with torch.no_grad(), cuda_bookkeeping_on_cpu():
            losses = [mean_loss(schedule(data_iterator=per_chunk(valid.step(num_microbatches)), forward_only=True), groups)
                      for _ in range(config.eval.iters)]
        engine.train()
        return sum(losses) / len(losses)

    checkpointer = checkpoint.Checkpointer(ckpt_root, config.checkpoint.keep)

    def save() -> None:
        if reporting:
            history.save(history_path)
        trainer_state = {"step": step, "consumed_samples": batches.consumed_samples, "scheduler": scheduler.state_dict(),
                         "layout": layout.as_dict(), "model": model_config.architecture()}
        checkpointer.save(step, engine, trainer_state)

    profile_steps = config.logging.profile_steps
    profiler = StepProfiler(engine.module, *profile_steps, out / "profile") if profile_steps else None
    engine.train()
    metrics.start()
    while step < t.steps:
        if profiler:
            profiler.step_begin(step)
        with cuda_bookkeeping_on_cpu():
            losses = schedule(data_iterator=per_chunk(batches.step(num_microbatches)), forward_only=False)
        with component_range(profiling.OPTIMIZER):
            zero.finish_gradients(engine, groups)
            engine.step()
        scheduler.step(increment=1)
        step += 1
        loss = mean_loss(losses, groups)
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        history.train_loss[step] = loss
        if profiler and (summary := profiler.step_end(step)) is not None and rank0:
            print(f"profile of steps {profile_steps[0]}..{profile_steps[1] - 1} (rank 0):\n{profiling.format_table(summary)}\n"
                  f"written to {out / 'profile' / 'step_profile.json'}", flush=True)
        if reporting:
            log = step % config.logging.interval == 0 or step == t.steps
            metrics.train(step, loss, engine.optimizer.param_groups[0]["lr"], grad_norm, log)
        if valid_ds is not None and config.eval.interval and (step % config.eval.interval == 0 or step == t.steps):
            valid_loss = validate()
            history.valid_loss[step] = valid_loss
            if reporting:
                metrics.validation(step, valid_loss)
        checkpointer.poll()
        stopping = stop.agreed()
        if stopping or step == t.steps or (config.checkpoint.interval and step % config.checkpoint.interval == 0):
            save()
            metrics.start()  # checkpoint time is not training throughput
        if stopping:
            if rank0:
                print(f"stopping at step {step} on a signal; the next run with --resume continues from here", flush=True)
            break
    checkpointer.wait()
    metrics.close()
    if reporting:
        metrics.summary(f"{'finished' if step == t.steps else 'stopped'}: {trained}", {
            "checkpoint": checkpoint.latest_checkpoint(ckpt_root),
            "TensorBoard": f"tensorboard --logdir {out / 'tb'}" if config.logging.tensorboard else "off",
            "log": out / "train.log", "loss history": history_path})
    shutdown()
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, epilog=describe_keys(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the full resolved config as TOML and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.steps=200")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_toml(config), end="")
            return 0
        run(config, args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
