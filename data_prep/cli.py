"""Command line of data_prep: corpora -> SentencePiece tokenizer -> megatron-core indexed datasets.

Each command has --help; every command says what it does and where it wrote its results.
"""

import argparse
import os
import sys
import time

from data_prep.inputs import FORMATS, InputError, resolve_inputs, sample_documents


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except InputError as error:
        print(f"data_prep {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output that cannot be written, an input that cannot be read
        where = f" {error.filename}" if error.filename else ""
        print(f"data_prep {args.command}: error: cannot use{where}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndata_prep {args.command}: interrupted; no partial output was left under the final names", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on a sample of the inputs")
    _input_arguments(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, metavar="DIR", help="writes DIR/tokenizer.model and its metadata")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--sample-mb", type=float, default=256, help="text to train on, drawn from all inputs (default 256)")
    train.add_argument("--threads", type=int, default=os.cpu_count())
    train.add_argument("--overwrite", action="store_true", help="replace an existing DIR/tokenizer.model")
    train.set_defaults(run=run_train_tokenizer)

    tokenize = commands.add_parser("tokenize", help="tokenize inputs into megatron-core indexed datasets")
    _input_arguments(tokenize)
    tokenize.add_argument("--tokenizer", required=True, help="tokenizer.model (SentencePiece), tokenizer.json (HF), or their directory")
    tokenize.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.json (PREFIX_train/_valid with a split)")
    tokenize.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    tokenize.add_argument("--eod-token", help="token ending each document (default: the tokenizer's eos)")
    tokenize.add_argument("--valid-fraction", type=float, default=0.0, help="share of documents for PREFIX_valid")
    tokenize.add_argument("--split-seed", type=int, default=1234, help="seed of the document hash that picks validation documents")
    tokenize.add_argument("--one-output-per-input", action="store_true", help="write PREFIX_<input name> for each input file")
    tokenize.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    tokenize.add_argument("--resume", action="store_true", help="keep outputs that are complete, redo the rest")
    tokenize.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    tokenize.add_argument("--num-shards", type=int, default=1, metavar="N",
                          help="with --one-output-per-input: split the input files into N shards and do only one (a Slurm array task each)")
    tokenize.add_argument("--shard-index", type=int, default=0, metavar="I", help="which shard, 0 .. N-1: input files I, I+N, I+2N, ...")
    tokenize.set_defaults(run=run_tokenize)

    inputs = commands.add_parser("list-inputs", help="the input files --input names, in the order tokenize reads them")
    inputs.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="files, directories or quoted globs")
    inputs.add_argument("--input-format", choices=("auto",) + FORMATS, default="auto", help="default: from the file names")
    inputs.set_defaults(run=run_list_inputs)

    corpus = commands.add_parser("default-corpus", help="tokenizer + train/valid datasets from the Python standard library's source")
    corpus.add_argument("--output", required=True, metavar="DIR")
    corpus.add_argument("--vocab-size", type=int, default=8192)
    corpus.add_argument("--workers", type=int, default=os.cpu_count())
    corpus.set_defaults(run=run_default_corpus)

    blend = commands.add_parser("blend", help="check datasets share a tokenizer and write a weighted blend for pretraining")
    blend.add_argument("--datasets", nargs="+", required=True, metavar="PREFIX", help="prefixes or quoted globs of prefixes")
    blend.add_argument("--weights", nargs="+", type=float, help="one per dataset (default: each dataset's token count)")
    blend.add_argument("--valid-datasets", nargs="+", metavar="PREFIX", help="validation prefixes or globs")
    blend.add_argument("--valid-weights", nargs="+", type=float, help="default: token counts")
    blend.add_argument("--output", metavar="FILE", help="write the blend as JSON, a manifest for pretraining's data.manifest")
    blend.set_defaults(run=run_blend)
    return parser


def _input_arguments(parser):
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="files, directories or quoted globs")
    parser.add_argument("--json-key", default="text", help="JSON key (or Parquet column) holding the text (default: text)")
    parser.add_argument("--input-format", choices=("auto",) + FORMATS, default="auto", help="default: from the file names")
    parser.add_argument(
        "--text-document", choices=("line", "file"), default="line", help="a document of a text file: one line (default) or the whole file"
    )


def run_train_tokenizer(args):
    from data_prep.tokenizers import train_sentencepiece

    model_path = os.path.join(args.output, "tokenizer.model")
    if os.path.exists(model_path) and not args.overwrite:
        raise InputError(f"{model_path} already exists: pass --overwrite to replace it, or choose another --output")
    files = resolve_inputs(args.input, args.input_format)
    print(f"train-tokenizer: {args.model_type} vocab {args.vocab_size} on up to {args.sample_mb:g} MB from {len(files)} input file(s)")
    start = time.monotonic()
    sample = sample_documents(files, int(args.sample_mb * 1e6), args.json_key, args.text_document)
    meta = train_sentencepiece(sample, args.output, args.vocab_size, args.model_type, args.threads)
    trained_on = meta["trained_on"]
    print(
        f"train-tokenizer: trained on {trained_on['documents']:,} documents ({trained_on['bytes'] / 1e6:,.1f} MB)"
        f" in {time.monotonic() - start:.1f} s; eod </s> = {meta['eod_id']}, pad <pad> = {meta['pad_id']}"
    )
    print(f"train-tokenizer: wrote {model_path} and tokenizer_meta.json, tokenizer_config.json, special_tokens_map.json")


def run_tokenize(args):
    from data_prep.pipeline import TokenizeSettings, plan_outputs, tokenize
    from data_prep.tokenizers import cached_path_unavailable, load_tokenizer_info

    if not 0 <= args.valid_fraction < 1:
        raise InputError(f"--valid-fraction {args.valid_fraction} must be in [0, 1)")
    files = resolve_inputs(args.input, args.input_format)
    tokenizer = load_tokenizer_info(args.tokenizer, args.eod_token)
    settings = TokenizeSettings(
        tokenizer=tokenizer,
        json_key=args.json_key,
        text_document=args.text_document,
        valid_fraction=args.valid_fraction,
        split_seed=args.split_seed,
        workers=max(1, args.workers),
        strict=args.strict,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    groups = plan_outputs(files, args.output_prefix, args.one_output_per_input, args.valid_fraction)
    if args.num_shards != 1 or args.shard_index:
        if not args.one_output_per_input:
            raise InputError("--num-shards needs --one-output-per-input: every shard writes the outputs of its own input files")
        if not 0 <= args.shard_index < args.num_shards:
            raise InputError(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
        groups = groups[args.shard_index :: args.num_shards]
        files = [f for group in groups for f in group.files]
        print(f"tokenize: shard {args.shard_index} of {args.num_shards}: {len(files)} input file(s)")
        if not files:
            print("tokenize: nothing to do in this shard")
            return
    size = sum(f.size for f in files)
    print(
        f"tokenize: {len(files)} input file(s), {size / 1e6:,.1f} MB, with {tokenizer.path}"
        f" (vocab {tokenizer.vocab_size}, eod {tokenizer.eod_id}), {settings.workers} worker(s)"
    )
    reason = cached_path_unavailable(tokenizer)
    print("tokenize: encoding through the SentencePiece part cache" if reason is None else f"tokenize: plain batch encoding ({reason})")
    start = time.monotonic()
    totals = tokenize(groups, settings)
    print_summary(totals, groups, time.monotonic() - start)


def print_summary(totals, groups, seconds: float):
    documents = sum(totals.documents.values())
    tokens = sum(totals.tokens.values())
    print(f"tokenize: {documents:,} documents, {tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")
    for group in groups:
        if group in totals.skipped_groups:
            print(f"  kept (already complete): {', '.join(group.prefixes.values())}")
            continue
        for split, prefix in group.prefixes.items():
            documents, tokens = totals.written[prefix]
            print(f"  wrote {prefix}.bin/.idx/.json ({split}: {documents:,} document(s), {tokens:,} tokens)")
    for note in totals.notes:
        print(f"  note: {note}")
    if totals.empty:
        print(f"  dropped {totals.empty:,} empty document(s)")
    for path, counts in totals.skipped.items():
        reasons = ", ".join(
            f"{reason}: {count:,} (lines {', '.join(map(str, totals.first_skipped_lines[path][reason]))}{', ...' if count > len(totals.first_skipped_lines[path][reason]) else ''})"
            for reason, count in counts.items()
        )
        print(f"  skipped {sum(counts.values()):,} line(s) of {path}: {reasons}")


def run_default_corpus(args):
    from data_prep.default_corpus import build_default_corpus

    build_default_corpus(args.output, args.vocab_size, max(1, args.workers))


def run_list_inputs(args):
    for file in resolve_inputs(args.input, args.input_format):
        print(file.path)


def run_blend(args):
    from data_prep.blend import describe_blend, expand_datasets, training_manifest, write_blend

    blend = describe_blend(expand_datasets(args.datasets), args.weights)
    valid = describe_blend(expand_datasets(args.valid_datasets), args.valid_weights) if args.valid_datasets else None
    print("blend: datasets share tokenizer", blend["tokenizer_model"], f"(vocab {blend['vocab_size']}, eod {blend['eod_id']})")
    for name, part in (("train", blend), ("valid", valid)):
        if part is None:
            continue
        print(f"blend ({name}): {len(part['prefixes'])} dataset(s), {sum(part['tokens']):,} tokens")
        for weight, prefix, tokens in zip(part["weights"], part["prefixes"], part["tokens"]):
            print(f"  {weight:.4f}  {prefix}  ({tokens:,} tokens)")
    print("blend: megatron blend =", [blend["prefixes"], blend["weights"]])
    if args.output:
        write_blend(args.output, training_manifest(blend, valid))
        print(f"blend: wrote {args.output} (pretraining reads it as data.manifest)")
