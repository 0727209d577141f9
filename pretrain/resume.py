"""What a --resume will do, known from the checkpoint's trainer.json before any process group exists."""

from pathlib import Path

from kla_megatron.config import ModelConfig
from pretrain import checkpoint
from pretrain.config import ConfigError, TrainingSection


def check_resume(latest: Path, model: ModelConfig, t: TrainingSection) -> tuple[int, list[str]]:
    """Before any process group: the step `latest` holds, and notes on what of this run's config it
    keeps as saved. Refuses another model (same shapes would load, and a KLA run go on as GDN)."""
    saved = checkpoint.read_trainer_state(latest)
    ours = model.architecture()
    if saved.get("model", ours) != ours:  # checkpoints written before the model was recorded pass
        changed = ", ".join(f"model.{k} {saved['model'].get(k)!r} -> {v!r}" for k, v in ours.items() if saved["model"].get(k) != v)
        raise ConfigError(
            f"{latest} holds another model than this run asks for ({changed}); resume with the same "
            "model settings, or train the new model in a new output_dir"
        )
    # megatron's scheduler resumes with the schedule it saved, whatever the config says now.
    asked = {"training.lr": ("max_lr", t.lr), "training.min_lr": ("min_lr", t.min_lr), "training.steps": ("lr_decay_steps", t.steps),
             "training.warmup_steps": ("lr_warmup_steps", t.warmup_steps), "training.lr_decay_style": ("lr_decay_style", t.lr_decay_style),
             "training.weight_decay": ("start_wd", t.weight_decay)}
    kept = [f"{key}={saved['scheduler'][name]} (not {value})" for key, (name, value) in asked.items() if saved["scheduler"][name] != value]
    notes = [f"the learning-rate schedule goes on as saved in {latest}: {', '.join(kept)}"] if kept else []
    return saved["step"], notes
