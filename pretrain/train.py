"""The training program: config -> checks -> distributed start -> model -> DeepSpeed ZeRO -> data ->
megatron's schedule, step after step -> validation, TensorBoard, checkpoints.

    python -m pretrain --config configs/tiny.toml [--resume] [section.key=value ...]

Launch with torchrun, srun or mpiexec for several processes; alone it runs as one process.
"""

import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from kla_megatron import build_model, transformer_config
from kla_megatron.config import ModelConfig
from pretrain import checkpoint, zero
from pretrain.config import ConfigError, TrainConfig, config_toml, describe_keys, load_config, save_config
from pretrain.cpu import cuda_bookkeeping_on_cpu
from pretrain.data import DataFiles, MicroBatches, build_datasets, load_tokenizer
from pretrain.distributed import init_distributed, launch_env, shutdown
from pretrain.history import History
from pretrain.metrics import Metrics, model_flops_per_token
from pretrain.resume import check_resume
from pretrain.run_log import log_to_file


# megatron's OptimizerParamScheduler styles that need no settings of their own (WSD needs several).
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")


def check_config(config: TrainConfig, world_size: int) -> tuple[ModelConfig, DataFiles]:
    """Every check that needs no process group or GPU: bad input stops here, with its fix."""
    model = config.model.resolve()
    p, t, d = config.parallel, config.training, config.data
    cuda = torch.cuda.is_available()
    if world_size % (p.tensor * p.pipeline * p.context):
        raise ConfigError(
            f"{world_size} process(es) cannot be split into tensor={p.tensor} x pipeline={p.pipeline} x "
            f"context={p.context}; launch a multiple of {p.tensor * p.pipeline * p.context} processes"
        )
    dp = world_size // (p.tensor * p.pipeline * p.context)
    if model.num_heads % p.tensor:
        raise ConfigError(
            f"model {config.model.name} has {model.num_heads} heads, not divisible by parallel.tensor={p.tensor}; "
            f"choose a tensor-parallel size that divides {model.num_heads}"
        )
    if model.num_layers % p.pipeline:
        raise ConfigError(f"{model.num_layers} layers cannot be split into parallel.pipeline={p.pipeline} equal stages")
    if p.context > 1:
        raise ConfigError("parallel.context > 1 is not available yet (context parallelism is its own issue); set parallel.context=1")
    if d.seq_length <= 0 or d.seq_length % p.context:
        raise ConfigError(f"data.seq_length={d.seq_length} must be positive and divisible by parallel.context={p.context}")
    if p.sequence_parallel and (p.tensor == 1 or d.seq_length % p.tensor):
        raise ConfigError(
            f"parallel.sequence_parallel needs parallel.tensor > 1 dividing data.seq_length ({d.seq_length}); "
            f"got tensor={p.tensor}"
        )
    if p.zero_stage not in (1, 2):
        raise ConfigError(f"parallel.zero_stage must be 1 or 2 (got {p.zero_stage}); ZeRO-3 does not fit megatron's TP")
    if p.zero_stage == 2 and p.pipeline > 1:
        raise ConfigError("ZeRO stage 2 shards gradients, which DeepSpeed cannot do with pipeline parallelism; use zero_stage=1")
    if p.pipeline > 1 and not cuda:
        raise ConfigError("parallel.pipeline > 1 needs GPUs (megatron's pipeline send/recv is CUDA-only)")
    if p.sequence_parallel and not cuda:
        raise ConfigError("parallel.sequence_parallel needs GPUs (megatron's sequence parallelism forks a CUDA RNG state); set it to false")
    if t.recompute and not cuda:
        raise ConfigError("training.recompute needs a GPU (megatron's activation recompute saves CUDA RNG states); set it to false")
    if model.kernel_backend == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.kernel_backend=triton needs a GPU (or TRITON_INTERPRET=1, slow, for tests); use auto or torch on CPU")
    if p.pipeline > 1 and model.tie_embeddings:
        raise ConfigError("tied embeddings across pipeline stages are not supported yet; set model.tie_embeddings=false")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"training.precision must be auto, bf16 or fp32, got {t.precision!r}")
    if t.precision == "bf16" and not cuda:
        raise ConfigError("training.precision=bf16 needs a GPU; use fp32 (or auto) on CPU")
    if not 0 <= t.warmup_steps < t.steps:
        raise ConfigError(
            f"training.warmup_steps={t.warmup_steps} must be in [0, training.steps={t.steps}); lower it or raise training.steps"
        )
    if t.lr_decay_style not in LR_DECAY_STYLES:
        raise ConfigError(f"training.lr_decay_style must be one of {', '.join(LR_DECAY_STYLES)}, got {t.lr_decay_style!r}")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"training.min_lr={t.min_lr} must be in [0, training.lr={t.lr}]")
    init_from = config.checkpoint.init_from
    if init_from and not (Path(init_from) / "model" / "metadata.json").is_file():
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
    return model, files


def forward_step(engine, data_iterator, model):
    """One micro-batch through the model; megatron's schedule calls this and then backward.

    The schedule is handed the bare megatron model (it reads its config and, with pipelining, sets
    its input tensor); the forward itself goes through the DeepSpeed engine, whose output hooks
    run ZeRO's backward bookkeeping when the schedule calls torch.autograd.backward."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    per_token_loss = engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, partial(masked_mean, batch["loss_mask"])


def masked_mean(loss_mask, per_token_loss):
    mask = loss_mask.float()
    loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1)
    # A copy: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"loss": loss.detach().clone()}


def mean_loss(losses: list) -> float:
    """Mean over micro-batches and data-parallel ranks (on the last pipeline stage; 0 elsewhere)."""
    if not losses:
        return 0.0
    value = torch.stack([x["loss"] for x in losses]).mean()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


class StopSignal:
    """SIGTERM or SIGUSR1 (Slurm's warning before the time limit, or a requeue) asks the run to
    checkpoint at the end of the current step and stop; ranks agree on it with one all-reduce a step."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([int(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def is_reporting_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def run(config: TrainConfig, resume: bool) -> History:
    stop = StopSignal()  # first: a signal during start-up is honoured after the first step
    env = launch_env()
    model_config, files = check_config(config, env.world_size)
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    if not resume and checkpoint.latest_checkpoint(ckpt_root) is not None:
        raise ConfigError(f"{ckpt_root} already holds a checkpoint; pass --resume to continue it, or use a new output_dir")

    p, t = config.parallel, config.training
    latest = checkpoint.latest_checkpoint(ckpt_root) if resume else None
    saved_step, notes = check_resume(latest, model_config, t) if latest is not None else (0, [])
    if saved_step >= t.steps:
        if env.rank == 0:
            print(f"nothing to do: {latest} is step {saved_step} and training.steps={t.steps}; raise training.steps to train further", flush=True)
        return History()
    init_distributed(env, p.tensor, p.pipeline, p.context)
    rank0 = dist.get_rank() == 0
    reporting = is_reporting_rank()
    if rank0 or reporting:
        log_to_file(out / ("train.log" if rank0 else f"train_rank{dist.get_rank()}.log"))
    for note in notes if rank0 else ():
        print(f"note: {note}", flush=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp_size)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())
    torch.manual_seed(t.seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(t.seed)

    tokenizer = load_tokenizer(files.tokenizer)
    tf_config = transformer_config(
        model_config,
        tensor_parallel=p.tensor,
        pipeline_parallel=p.pipeline,
        context_parallel=p.context,
        sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute=t.recompute,
    )
    model = build_model(model_config, tf_config, tokenizer.vocab_size, config.data.seq_length)
    start_weights = latest or (Path(config.checkpoint.init_from) if config.checkpoint.init_from else None)
    if start_weights is not None:
        # Before DeepSpeed takes its fp32 master copy of the weights.
        checkpoint.load_model(start_weights, model)
    engine = zero.initialize(model, config, bf16, dp_size)
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
    )
    layout = {"world_size": env.world_size, "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context, "zero_stage": p.zero_stage}
    step, consumed = 0, 0
    if latest is not None:
        state = checkpoint.load_training_state(latest, engine, config.checkpoint.load_optimizer, layout)
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
            f"{env.world_size} process(es) ({env.launcher}): TP {p.tensor} PP {p.pipeline} CP {p.context} DP {dp_size}, "
            f"ZeRO-{p.zero_stage}, {'bf16' if bf16 else 'fp32'} on {'cuda' if torch.cuda.is_available() else 'cpu'} | "
            f"{num_microbatches} micro-batches x {t.micro_batch_size} x {config.data.seq_length} tokens per rank "
            f"({tokens_per_step} tokens a step) | outputs in {out}",
            flush=True,
        )

    forward_backward = get_forward_backward_func()
    schedule = partial(
        forward_backward,
        forward_step_func=partial(forward_step, engine),
        model=engine.module,
        num_microbatches=num_microbatches,
        seq_length=config.data.seq_length,
        micro_batch_size=t.micro_batch_size,
    )

    def validate() -> float:
        engine.eval()
        valid = MicroBatches(valid_ds, t.micro_batch_size, dp_rank, dp_size)
        with torch.no_grad(), cuda_bookkeeping_on_cpu():
            losses = [mean_loss(schedule(data_iterator=valid.step(num_microbatches), forward_only=True)) for _ in range(config.eval.iters)]
        engine.train()
        return sum(losses) / len(losses)

    def save() -> None:
        if reporting:
            history.save(history_path)
        trainer_state = {"step": step, "consumed_samples": batches.consumed_samples, "scheduler": scheduler.state_dict(), "layout": layout,
                         "model": model_config.architecture()}
        path = checkpoint.save(ckpt_root, step, engine, trainer_state, config.checkpoint.keep)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)

    engine.train()
    metrics.start()
    while step < t.steps:
        with cuda_bookkeeping_on_cpu():
            losses = schedule(data_iterator=batches.step(num_microbatches), forward_only=False)
        engine.step()
        scheduler.step(increment=1)
        step += 1
        loss = mean_loss(losses)
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        history.train_loss[step] = loss
        if reporting:
            log = step % config.logging.interval == 0 or step == t.steps
            metrics.train(step, loss, engine.optimizer.param_groups[0]["lr"], grad_norm, log)
        if valid_ds is not None and config.eval.interval and (step % config.eval.interval == 0 or step == t.steps):
            valid_loss = validate()
            history.valid_loss[step] = valid_loss
            if reporting:
                metrics.validation(step, valid_loss)
        stopping = stop.agreed()
        if stopping or step == t.steps or (config.checkpoint.interval and step % config.checkpoint.interval == 0):
            save()
            metrics.start()  # checkpoint time is not training throughput
        if stopping:
            if rank0:
                print(f"stopping at step {step} on a signal; the next run with --resume continues from here", flush=True)
            break
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
