"""Export a training checkpoint to a Hugging Face model folder, and import such a folder back.

    python -m kla_megatron.export_hf --checkpoint outputs/tiny/checkpoints --output outputs/tiny/hf [--dtype bf16|fp32]
    python -m kla_megatron.export_hf --from-hf outputs/tiny/hf --output outputs/tiny/imported

Export: --checkpoint is a run's checkpoints folder (its newest complete checkpoint is taken) or one step_N folder,
saved at any tensor/pipeline-parallel layout. Its fp32 master weights are loaded into a one-process megatron model on
the CPU (pretrain.checkpoint.load_model reshards them), padded vocabulary rows are dropped, and the folder gets config.json (with
auto_map), model.safetensors (sharded past 4 GB, with its index), generation_config.json, the tokenizer
(kla_megatron/hf/tokenizer.py) and the model's code, copied from this checkout (kla_megatron/hf/shipped_code.py). It
loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where only torch and transformers
are installed. The run's settings come from the step's config.json, else the run's (OUTPUT_DIR/config.json); the
tokenizer from the step's tokenizer/ folder, else the one the run's config names (or --tokenizer).

Import (--from-hf): an exported folder becomes a weights-only step folder, state/ (fp32 masters as training saves
them, dist_checkpointing: loads at any TP/PP layout), config.json and tokenizer/, to start a run from with
`checkpoint.init_from=OUTPUT`. The padded vocabulary rows it adds are zero (the export dropped the trained ones).

Both write OUTPUT.partial and rename it when complete, so a killed run never leaves a folder that looks complete.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
MAX_SHARD_SIZE = "4GB"
PARTIAL = ".partial"


class ExportError(ValueError):
    """Bad input to the export or the import, named with its fix."""


def find_step(path: Path) -> Path:
    """The checkpoint to export: `path` itself when it is a step folder, else the newest complete one in it."""
    from pretrain.checkpoint import is_checkpoint

    if not path.exists():
        raise ExportError(f"--checkpoint {path} does not exist: give a run's checkpoints folder or one of its step_N folders")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if is_checkpoint(path):
        return path
    if path.name.endswith(PARTIAL):
        raise ExportError(f"{path} is a half-written checkpoint (a run was stopped while saving it): export a complete "
                          f"step_N folder or the checkpoints folder around it")
    latest = path / "latest"
    if latest.is_file():
        named = path / latest.read_text().strip()
        if is_checkpoint(named):
            return named
    complete = sorted(p for p in path.glob("step_*") if is_checkpoint(p) and p.suffix != PARTIAL)
    if complete:
        return complete[-1]
    partial = sorted(p.name for p in path.glob(f"step_*{PARTIAL}"))
    found = f" (only the half-written {', '.join(partial)})" if partial else ""
    raise ExportError(f"{path} holds no complete checkpoint{found}: point --checkpoint at a run's checkpoints folder "
                      f"with a finished step_N, or at one step_N folder")


def run_settings(step: Path, tokenizer: str = None):
    """(ModelConfig, sequence length, tokenizer path, end-of-document id or None for the tokenizer's own) of the run
    that saved `step`."""
    from pretrain.config import ConfigError, ModelSection

    candidates = [step / "config.json", step.parent.parent / "config.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ExportError(f"no run config for {step}: neither {candidates[0]} nor {candidates[1]} exists "
                          f"(python -m pretrain writes OUTPUT_DIR/config.json); export from the run's own folder")
    settings = json.loads(found.read_text())
    try:
        model = ModelSection(**settings["model"]).resolve()
    except (ConfigError, KeyError, TypeError) as error:
        raise ExportError(f"{found} does not describe a model of this project ({error})") from None
    data = settings.get("data", {})
    eod_id = None
    if tokenizer is None:
        saved = [step / "tokenizer" / name for name in ("tokenizer.model", "tokenizer.json")]
        tokenizer = next((str(p) for p in saved if p.is_file()), None) or data.get("tokenizer")
    if tokenizer is None and data.get("manifest"):
        manifest = Path(data["manifest"])
        if not manifest.is_file():
            raise ExportError(f"the data manifest {manifest} named by {found} does not exist: run the export from the "
                              f"directory training ran in, or pass --tokenizer PATH")
        manifest = json.loads(manifest.read_text())
        tokenizer, eod_id = manifest["tokenizer_model"], manifest.get("eod_id")
    if tokenizer is None:
        raise ExportError(f"{found} names no tokenizer (data.tokenizer or data.manifest): pass --tokenizer PATH")
    if not Path(tokenizer).is_file():
        raise ExportError(f"tokenizer {tokenizer} does not exist: run the export from the directory training ran in, "
                          f"or pass --tokenizer PATH (the tokenizer.model or tokenizer.json the run trained with)")
    return model, data.get("seq_length", 4096), Path(tokenizer), eod_id


def tokenizer_info(path: Path):
    """data_prep's description of the tokenizer (vocabulary size, end-of-document id), as training read it."""
    from data_prep.inputs import InputError
    from data_prep.tokenizers import load_tokenizer_info

    try:
        return load_tokenizer_info(str(path))
    except InputError as error:
        raise ExportError(str(error)) from None


@contextlib.contextmanager
def one_process_megatron():
    """torch.distributed with one process (gloo, in-memory store) and megatron's parallel state at TP = PP = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise ExportError("the export runs in a process of its own: start it with python, not under torchrun or srun")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def build_megatron(model, vocab_rows: int, seq_length: int):
    """The whole model (TP = PP = 1, fp32) on the CPU with `vocab_rows` embedding rows, parameters uninitialised."""
    import dataclasses

    from kla_megatron import build_model, transformer_config

    config = transformer_config(model, use_cpu_initialization=True)
    return build_model(model, dataclasses.replace(config, perform_initialization=False), vocab_rows, seq_length)


def load_megatron(step: Path, model, seq_length: int, vocab_size: int):
    """The checkpoint's fp32 master weights in a one-process model (pretrain.checkpoint.load_model reshards them)."""
    from kla_megatron import padded_vocab_size
    from pretrain import checkpoint
    from pretrain.config import ConfigError

    trainer = step / "trainer.json"
    tensor_parallel = json.loads(trainer.read_text())["layout"]["tensor"] if trainer.is_file() else 1
    megatron = build_megatron(model, padded_vocab_size(vocab_size, tensor_parallel), seq_length)
    try:
        checkpoint.load_model(step, megatron)
    except ConfigError as error:
        raise ExportError(f"{error}: the checkpoint does not hold the model its run config names") from None
    return megatron


def hf_tensors(megatron, model, vocab_size: int, dtype) -> dict:
    """The HF model's tensors from the megatron model's parameters: renamed, vocabulary rows cut to `vocab_size`."""
    from kla_megatron.hf.convert import VOCABULARY_ROWS, hf_name

    tensors = {}
    for name, param in megatron.named_parameters():
        hf = hf_name(name)
        tensor = param.detach()[:vocab_size] if hf in VOCABULARY_ROWS else param.detach()
        tensors[hf] = tensor.to(dtype).contiguous()
    if model.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors


def check_against_model(config, tensors: dict, where: str) -> None:
    """Every parameter of the HF model built from `config` is in `tensors` with its shape, and nothing else is."""
    import torch

    from kla_megatron.hf.modeling_kla import KLAForCausalLM

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in KLAForCausalLM(config).named_parameters()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    problems = [f"{n} missing" for n in sorted(set(expected) - set(got))]
    problems += [f"{n} unexpected" for n in sorted(set(got) - set(expected))]
    problems += [f"{n} has shape {got[n]}, the config gives {expected[n]}" for n in sorted(set(got) & set(expected))
                 if got[n] != expected[n]]
    if problems:
        raise ExportError(f"{where} does not match its config.json: {'; '.join(problems[:4])}"
                          f"{' ...' if len(problems) > 4 else ''}: it is not an export of this project, or was altered")


def write_weights(tensors: dict, folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{folder} holds no model.safetensors (nor its index): import a folder this export wrote")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool):
    """Yields OUTPUT.partial to fill; renames it to OUTPUT (replacing an old one when `overwrite`) when the block ends."""
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists: pass --overwrite to replace it, or choose another --output")
    partial = output.with_name(output.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise ExportError(f"cannot create {partial} ({error.strerror}): choose a writable --output") from None
    yield partial
    for file in partial.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    old = output.with_name(output.name + ".old")
    if output.exists():
        os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: Path, output: Path, dtype: str = None, overwrite: bool = False, tokenizer: str = None) -> Path:
    """Writes the HF folder `output` from a checkpoint (see the module docstring); returns the step exported."""
    step = find_step(checkpoint)
    model, seq_length, tokenizer_path, eod_id = run_settings(step, tokenizer)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists: pass --overwrite to replace it, or choose another --output")
    print(f"export: {step} ({model.mixer}, {model.num_layers} layers, hidden {model.hidden_size}) -> {output}")
    with one_process_megatron():
        megatron = load_megatron(step, model, seq_length, tokenizer_info(tokenizer_path).vocab_size)
    write_export(megatron, model, seq_length, tokenizer_path, output, dtype, overwrite, eod_id)
    return step


def write_export(megatron, model, seq_length: int, tokenizer: Path, output: Path, dtype: str = None,
                 overwrite: bool = False, eod_id: int = None) -> None:
    """Writes the HF folder of a whole megatron model (TP = PP = 1) in memory; dtype "bf16" / "fp32" (default: the
    model's own), eod_id the end-of-document token (default: the tokenizer's eos)."""
    import torch
    from transformers import GenerationConfig

    from kla_megatron.hf.convert import hf_config
    from kla_megatron.hf.shipped_code import write_shipped_files
    from kla_megatron.hf.tokenizer import TokenizerError, write_tokenizer

    info = tokenizer_info(tokenizer)
    rows = megatron.embedding.word_embeddings.weight.shape[0]
    if info.vocab_size > rows:
        raise ExportError(f"tokenizer {tokenizer} has {info.vocab_size} tokens but the model only {rows} rows: "
                          f"pass the tokenizer the run trained with (--tokenizer)")
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else megatron.embedding.word_embeddings.weight.dtype
    tensors = hf_tensors(megatron, model, info.vocab_size, torch_dtype)
    with atomic_folder(output, overwrite) as folder:
        try:
            token_ids = write_tokenizer(tokenizer, info.eod_id if eod_id is None else eod_id, folder)
        except TokenizerError as error:
            raise ExportError(str(error)) from None
        config = hf_config(model, info.vocab_size, seq_length, token_ids, str(torch_dtype).removeprefix("torch."))
        check_against_model(config, tensors, str(output))
        config.save_pretrained(str(folder))
        GenerationConfig(**token_ids).save_pretrained(str(folder))
        write_weights(tensors, folder)
        write_shipped_files(folder)
    size = sum(t.numel() for t in tensors.values())
    print(f"export: wrote {output} ({size / 1e6:.1f}M parameters, {str(torch_dtype).removeprefix('torch.')}, "
          f"vocabulary {info.vocab_size}): AutoModelForCausalLM.from_pretrained({str(output)!r}, trust_remote_code=True)")


def import_hf(folder: Path, output: Path, overwrite: bool = False) -> None:
    """Writes the step folder `output` (model/, config.json, tokenizer/) from an exported HF folder."""
    import torch

    from kla_megatron import padded_vocab_size
    from kla_megatron.hf.configuration_kla import KLAConfig
    from kla_megatron.hf.convert import VOCABULARY_ROWS, hf_name, model_config, model_section
    from pretrain.checkpoint import save_model

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder} holds no config.json: --from-hf takes a folder this export wrote")
    settings = json.loads(config_path.read_text())
    if settings.get("model_type") != KLAConfig.model_type:
        raise ExportError(f"{config_path} has model_type {settings.get('model_type')!r}, not {KLAConfig.model_type!r}: "
                          f"--from-hf takes a folder this export wrote")
    try:
        model = model_config(settings)
    except (KeyError, ValueError) as error:
        raise ExportError(f"{config_path} does not describe a model of this project ({error})") from None
    tensors = read_weights(folder)
    check_against_model(KLAConfig.from_dict(settings), tensors, str(folder))
    if model.tie_embeddings and not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
        raise ExportError(f"{config_path} says tie_word_embeddings but lm_head differs from the embeddings")
    tokenizers = [name for name in ("tokenizer.model", "tokenizer.json") if (folder / name).is_file()]
    if not tokenizers:
        raise ExportError(f"{folder} holds no tokenizer.model or tokenizer.json: import a folder this export wrote")
    vocab_size = settings["vocab_size"]
    seq_length = settings["max_position_embeddings"]
    print(f"import: {folder} ({model.mixer}, {model.num_layers} layers, hidden {model.hidden_size}) -> {output}")
    with one_process_megatron():
        megatron = build_megatron(model, padded_vocab_size(vocab_size, 1), seq_length)
        with torch.no_grad():
            for name, param in megatron.named_parameters():
                hf = hf_name(name)
                if hf in VOCABULARY_ROWS:
                    param.zero_()
                    param[:vocab_size] = tensors[hf]
                else:
                    param.copy_(tensors[hf])
        with atomic_folder(output, overwrite) as step:
            save_model(step, megatron)
            (step / "tokenizer").mkdir()
            for name in tokenizers + ["tokenizer_config.json", "special_tokens_map.json"]:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, step / "tokenizer" / name)
            run = {"model": model_section(model),
                   "data": {"tokenizer": str(output.resolve() / "tokenizer" / tokenizers[0]), "seq_length": seq_length}}
            (step / "config.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"import: wrote {output}: start a run from it with checkpoint.init_from={output} "
          f"(model.name={run['model']['name']} with {run['model']['overrides'] or 'no'} overrides)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kla_megatron.export_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a run's checkpoints folder or one step_N folder to export")
    source.add_argument("--from-hf", type=Path, metavar="FOLDER", help="an exported folder to turn back into a checkpoint")
    parser.add_argument("--output", type=Path, required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights of the export (default fp32, the checkpoint's masters)")
    parser.add_argument("--tokenizer", help="the run's tokenizer.model / tokenizer.json, when its config.json names "
                                            "one that is not there")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint is not None:
            export(args.checkpoint, args.output, args.dtype, args.overwrite, args.tokenizer)
        else:
            if args.dtype or args.tokenizer:
                raise ExportError("--dtype and --tokenizer apply to --checkpoint; --from-hf keeps the folder's own")
            import_hf(args.from_hf, args.output, args.overwrite)
    except ExportError as error:
        print(f"export_hf: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
