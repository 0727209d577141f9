"""The training configuration: a typed dataclass tree, read from TOML, overridden on the command line.

    python -m pretrain --config configs/tiny.toml training.steps=200 parallel.tensor=2 model.mixer=\"gdn\"

Every key is checked against the tree: a misspelt key stops the run at once with the list of valid
keys, before any process group, GPU memory or data is touched.
"""

import ast
import dataclasses
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from kla_megatron.config import NAMED_MODELS, RECOMPUTE_MODULES, RECOMPUTE_MODULES_NOT_OFFERED, ModelConfig, named_model


class ConfigError(ValueError):
    """A problem with the configuration, named with its fix."""


@dataclass
class ModelSection:
    name: str = "tiny"
    """A named model; its fields can be changed one by one as model.<field>."""
    overrides: dict = field(default_factory=dict)
    """Fields of ModelConfig to change, e.g. {mixer = "gdn"}; also settable as model.<field>=value."""

    def resolve(self) -> ModelConfig:
        hints = get_type_hints(ModelConfig)
        unknown = sorted(set(self.overrides) - set(hints))
        if unknown:
            raise ConfigError(f"unknown model setting(s) {unknown}; valid ones: {sorted(hints)}")
        overrides = {key: _check_type(value, hints[key], f"model.{key}") for key, value in self.overrides.items()}
        try:
            return dataclasses.replace(named_model(self.name), **overrides)
        except ValueError as e:  # an unknown name or an inconsistent shape
            raise ConfigError(str(e)) from None


@dataclass
class DataSection:
    manifest: Optional[str] = None
    """A data_prep manifest.json (the default corpus writes one): fills tokenizer and prefixes."""
    tokenizer: Optional[str] = None
    """SentencePiece tokenizer.model or HF tokenizer.json used to write the datasets."""
    train_prefixes: list = field(default_factory=list)
    """Megatron indexed datasets (PREFIX.bin/.idx); several are blended by train_weights."""
    train_weights: list = field(default_factory=list)
    """One positive weight per train prefix (normalised); empty weighs them by size."""
    valid_prefixes: list = field(default_factory=list)
    """Validation datasets; empty splits validation samples off train_prefixes by `split`."""
    valid_weights: list = field(default_factory=list)
    """One positive weight per valid prefix, as train_weights."""
    split: str = "99,1,0"
    """Train/valid/test split of train_prefixes, used only when valid_prefixes is empty."""
    seq_length: int = 256
    """Tokens per sample (documents are packed across sample boundaries)."""
    reset_state_at_eod: bool = False
    """Treat each EOD-terminated document of a sample as its own sequence: the conv, the recurrent state and
    attention restart at every document start (packed documents, megatron's THD format)."""


@dataclass
class TrainingSection:
    steps: int = 100
    """Optimizer steps of the whole run; the learning rate decays to min_lr over them."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks: a multiple of micro_batch_size x data-parallel size."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float = 1e-4
    """Learning rate at the last step."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr, in [0, steps)."""
    lr_decay_style: str = "cosine"
    """The learning-rate decay after warmup: cosine, linear, constant or inverse-square-root."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases, A_log and dt_bias)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    precision: str = "auto"
    """bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    recompute: bool = False
    """Full activation recompute, layer by layer."""
    recompute_modules: list = field(default_factory=list)
    """Selective activation recompute (with recompute=false): the parts of every layer rebuilt in the backward
    instead of kept, by megatron's names: "mlp" (the MLP's fc1 output and fc2 input; its input stays)."""
    seed: int = 1234

    def __post_init__(self):
        for module in self.recompute_modules:
            if module in RECOMPUTE_MODULES_NOT_OFFERED:
                raise ConfigError(f"training.recompute_modules: {module!r} is not offered: {RECOMPUTE_MODULES_NOT_OFFERED[module]}; "
                                  f"choose from {list(RECOMPUTE_MODULES)}")
        unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown:
            raise ConfigError(f"training.recompute_modules: unknown module(s) {unknown}; choose from {list(RECOMPUTE_MODULES)}")
        if self.recompute and self.recompute_modules:
            raise ConfigError("training.recompute=true already recomputes every layer whole; set training.recompute_modules=[] "
                              "or training.recompute=false (selective recompute)")


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor parallelism: heads (and MLP columns) split over this many ranks."""
    pipeline: int = 1
    """Pipeline parallelism: layers split into this many stages (megatron's 1F1B schedule)."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline stage; > 1 runs megatron's interleaved schedule."""
    pipeline_layers: list = field(default_factory=list)
    """Layers of each model chunk in layer order (pipeline x virtual_pipeline entries), for uneven splits,
    e.g. [6, 5] for 11 layers on 2 stages; empty: an even split."""
    context: int = 1
    """Context parallelism: every sequence split into this many contiguous slices."""
    sequence_parallel: bool = False
    """Split the sequence between tensor-parallel ranks outside the mixers (needs tensor > 1, GPUs)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO: 1 shards optimizer states, 2 also gradients (pipeline = 1 only)."""
    data: int = 0
    """Data-parallel size the layout is written for (GPUs = tensor x pipeline x context x data); the run
    refuses another process count. 0: whatever the launched processes give."""
    force_layout: bool = False
    """Start even when `python -m pretrain.estimate` says the layout cannot fit the GPU's memory."""


@dataclass
class EvalSection:
    interval: int = 50
    """Validate every N steps and at the end; 0 turns validation off."""
    iters: int = 4
    """Global batches per validation (the same ones every time)."""


@dataclass
class CheckpointSection:
    interval: int = 50
    """Save every N steps and at the end; 0 saves only at the end."""
    keep: int = 2
    """How many completed checkpoints to keep on disk (oldest go first)."""
    load_optimizer: bool = True
    """On --resume, restore the ZeRO optimizer state too; false keeps only the weights (another layout)."""
    init_from: Optional[str] = None
    """A checkpoint folder (checkpoints/step_N) whose model weights start a new run, at any TP/PP
    layout; optimizer, schedule and data position start fresh. Ignored when --resume finds one."""


@dataclass
class LoggingSection:
    interval: int = 1
    """Print a console line every N steps (TensorBoard gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tb."""
    profile_steps: list = field(default_factory=list)
    """[first, last): profile these steps with torch.profiler and write the GPU time per model component to
    output_dir/profile/step_profile.json (e.g. [10, 13]); empty: no profiling."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    """TensorBoard events (tb/), checkpoints (checkpoints/), logs and the resolved config go here."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_from_dict(cls, values: dict, where: str):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is ModelSection:
        # model.<field> is shorthand for model.overrides.<field>; ModelSection.resolve checks the names.
        values = dict(values)
        overrides = dict(values.pop("overrides", {}))
        overrides.update({k: values.pop(k) for k in list(values) if k not in names})
        values["overrides"] = overrides
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r}; valid keys under {where.rstrip('.') or 'the top level'}: {sorted(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it as a table, e.g. [{path}]")
            kwargs[key] = _section_from_dict(hint, value, f"{path}.")
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def _check_type(value: Any, hint, path: str):
    """The value if it has the annotated type (ints pass as floats), else a ConfigError."""
    if get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        (hint,) = [t for t in get_args(hint) if t is not type(None)]
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"config key {path!r} wants one of {', '.join(map(repr, get_args(hint)))}, got {value!r}")
        return value
    expected = get_origin(hint) or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ConfigError(f"config key {path!r} wants {_KIND[expected]}, got {value!r}")
    return value


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a table"}


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE, e.g. training.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.strip().split("."), value


def load_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """TOML file (optional) + KEY=VALUE overrides -> a checked TrainConfig."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing TOML file (see configs/)")
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is a value, not a section")
        node[keys[-1]] = value
    return config_from_dict(values)


def config_from_dict(values: dict) -> TrainConfig:
    """A checked TrainConfig from nested sections, e.g. a run's config.json (save_config) read back."""
    return _section_from_dict(TrainConfig, values, "")


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")



def _field_docs(cls) -> dict[str, str]:
    """The string under each field of a dataclass: its doc, which Python does not keep at run time."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: inspect.cleandoc(doc.value.value)
        for node, doc in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


def _toml(value) -> str:
    # JSON spells strings, numbers, booleans and lists of them as TOML does.
    return json.dumps(value)


def describe_keys() -> str:
    """Every config key with its default and its doc, generated from the dataclasses above (--help)."""
    lines = [
        "config keys, with their defaults: set them in a TOML file ([section] then key = value) or on the",
        "command line as section.key=value (TOML values; bare strings need no quotes).",
    ]

    def describe(cls, instance, prefix: str, skip=()):
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if f.name in skip or dataclasses.is_dataclass(value):
                continue
            lines.append(f"  {prefix}{f.name} = {'(unset)' if value is None else _toml(value)}")
            if f.name in docs:
                lines.extend(f"      {line}" for line in docs[f.name].splitlines())

    defaults = TrainConfig()
    describe(TrainConfig, defaults, "")
    for f in dataclasses.fields(TrainConfig):
        section = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines.append(f"\n[{f.name}]")
        describe(type(section), section, f"{f.name}.", skip=("overrides",))
        if isinstance(section, ModelSection):
            lines.append(f"      named models: {', '.join(NAMED_MODELS)}")
            lines.append(f"  model.<field>: each field of the named model can be changed; shown are model.name={_toml(section.name)}'s")
            describe(ModelConfig, section.resolve(), "model.")
    return "\n".join(lines)


def config_toml(config: TrainConfig) -> str:
    """The full resolved config as TOML (the named model spelt out field by field): what --print-config
    prints, and a valid config file that load_config reads back to the same run."""
    lines = []

    def section(instance, skip=()):
        for f in dataclasses.fields(instance):
            value = getattr(instance, f.name)
            if f.name in skip or dataclasses.is_dataclass(value):
                continue
            lines.append(f"# {f.name} unset" if value is None else f"{f.name} = {_toml(value)}")

    section(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"\n[{f.name}]")
            section(value, skip=("overrides",))
            if isinstance(value, ModelSection):
                section(value.resolve())
    return "\n".join(lines) + "\n"
