"""Benchmark: `python -m data_prep tokenize` against Megatron-LM's preprocess_data pipeline.

Both tokenize the same >= 200 MB JSONL of real text (the Python source on this machine: the standard
library, then the venv's site-packages, one file per document) with the same SentencePiece BPE 8K model
trained by `data_prep train-tokenizer`, on the same number of workers, as end-to-end commands. The
outputs must be byte-identical. Runs alternate (baseline, ours, baseline, ours, ...) and the best time
of each counts, since other jobs may share the machine.

The baseline is Megatron-LM's tools/preprocess_data.py (core_v0.16.1) reduced to what runs for this
input (`--append-eod`, GPTSentencePieceTokenizer, no sentence splitting): the main process reads lines,
a multiprocessing pool JSON-decodes and encodes one document at a time (imap, chunks of 32), and the
main process writes each document through megatron-core's IndexedDatasetBuilder.

    python bench/data_prep.py [--workers 2] [--rounds 2] [--work-dir /tmp/data_prep_bench]
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import site
import subprocess
import sys
import sysconfig
import time

CORPUS_BYTES = 210_000_000
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_prep.json")


# ---- the baseline, as Megatron-LM's tools/preprocess_data.py runs it ----


class MegatronEncoder:
    """preprocess_data.Encoder with GPTSentencePieceTokenizer, json key "text", --append-eod."""

    def __init__(self, model_path):
        self.model_path = model_path

    def initializer(self):
        import sentencepiece

        MegatronEncoder.tokenizer = sentencepiece.SentencePieceProcessor(model_file=self.model_path)

    def encode(self, json_line):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in ["text"]:
            sentences = [data[key]]
            doc_ids, sentence_lens = [], []
            for sentence in sentences:
                sentence_ids = MegatronEncoder.tokenizer.encode_as_ids(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0:
                doc_ids.append(MegatronEncoder.tokenizer.eos_id())
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def run_baseline(corpus, model_path, output_prefix, workers):
    import multiprocessing

    import sentencepiece
    from megatron.core.datasets import indexed_dataset

    encoder = MegatronEncoder(model_path)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=model_path).vocab_size()
    with open(corpus, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            output_prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size)
        )
        for doc, sentence_lens, _ in encoded_docs:
            for key in doc.keys():
                builder.add_document(doc[key], sentence_lens[key])
        builder.finalize(output_prefix + ".idx")
        pool.close()
        pool.join()


# ---- corpus, tokenizer, timing ----


def build_corpus(path):
    """JSONL of the Python source here, one file per document, sorted, until CORPUS_BYTES."""
    roots = [sysconfig.get_paths()["stdlib"], site.getsitepackages()[0]]
    written = documents = 0
    with open(path + ".partial", "w") as out:
        for root in roots:
            for directory, subdirectories, names in os.walk(root):
                subdirectories.sort()
                for name in sorted(names):
                    if not name.endswith(".py") or written >= CORPUS_BYTES:
                        continue
                    try:
                        with open(os.path.join(directory, name), encoding="utf-8") as f:
                            text = f.read()
                    except (UnicodeDecodeError, OSError):
                        continue
                    if text:  # Megatron writes empty documents, we drop them: keep them out
                        line = json.dumps({"text": text}) + "\n"
                        out.write(line)
                        written += len(line.encode())
                        documents += 1
    if written < CORPUS_BYTES:
        raise SystemExit(f"only {written / 1e6:.0f} MB of Python source here; the bench needs {CORPUS_BYTES / 1e6:.0f} MB")
    os.replace(path + ".partial", path)
    print(f"bench: built {path}: {documents:,} documents, {written / 1e6:.1f} MB")


def timed(command):
    """Wall seconds and CPU seconds (all processes) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def token_count(prefix):
    with open(prefix + ".json") as f:
        return json.load(f)["tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/data_prep_bench")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--baseline-only", nargs=3, metavar=("CORPUS", "MODEL", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        run_baseline(*args.baseline_only, args.workers)
        return

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = os.path.join(args.work_dir, "corpus.jsonl")
    if not os.path.exists(corpus):
        build_corpus(corpus)
    tokenizer_dir = os.path.join(args.work_dir, "tokenizer")
    model = os.path.join(tokenizer_dir, "tokenizer.model")
    if not os.path.exists(model):
        subprocess.run(
            [sys.executable, "-m", "data_prep", "train-tokenizer", "--input", corpus, "--vocab-size", "8192",
             "--sample-mb", "20", "--output", tokenizer_dir],
            check=True,
        )

    baseline_prefix = os.path.join(args.work_dir, "baseline")
    ours_prefix = os.path.join(args.work_dir, "ours")
    baseline_cmd = [sys.executable, os.path.abspath(__file__), "--workers", str(args.workers), "--baseline-only", corpus, model, baseline_prefix]
    ours_cmd = [sys.executable, "-m", "data_prep", "tokenize", "--input", corpus, "--tokenizer", model,
                "--output-prefix", ours_prefix, "--workers", str(args.workers), "--overwrite"]
    runs = {"baseline": [], "ours": []}
    for round_number in range(args.rounds):
        for name, command in (("baseline", baseline_cmd), ("ours", ours_cmd)):
            seconds, cpu = timed(command)
            runs[name].append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "load_average": os.getloadavg()[0]})
            print(f"bench: round {round_number + 1} {name}: {seconds:.1f} s wall, {cpu:.1f} s CPU")

    identical = all(sha256(baseline_prefix + ext) == sha256(ours_prefix + ext) for ext in (".bin", ".idx"))
    tokens = token_count(ours_prefix)
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
    rate = {name: tokens / best[name] for name in best}
    ratio = rate["ours"] / rate["baseline"]
    cpu_ratio = min(r["cpu_seconds"] for r in runs["baseline"]) / min(r["cpu_seconds"] for r in runs["ours"])

    print()
    print(f"| {'tool':<36} | {'best wall s':>11} | {'M tokens/s':>10} | {'CPU s':>6} |")
    print(f"|{'-' * 38}|{'-' * 13}|{'-' * 12}|{'-' * 8}|")
    for name, label in (("baseline", "Megatron-LM preprocess_data pipeline"), ("ours", "python -m data_prep tokenize")):
        cpu = min(r["cpu_seconds"] for r in runs[name])
        print(f"| {label:<36} | {best[name]:>11.1f} | {rate[name] / 1e6:>10.2f} | {cpu:>6.1f} |")
    print(f"\nours / baseline: {ratio:.2f}x tokens/s ({cpu_ratio:.2f}x less CPU); {tokens:,} tokens;"
          f" outputs byte-identical: {identical}")

    corpus_size = os.path.getsize(corpus)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "packages": _versions("sentencepiece", "numpy", "orjson", "megatron-core"),
        },
        "corpus": {"path": corpus, "bytes": corpus_size, "source": "Python source (stdlib + site-packages), JSONL"},
        "tokenizer": {"path": model, "type": "SentencePiece BPE", "vocab_size": 8192},
        "workers": args.workers,
        "tokens": tokens,
        "runs": runs,
        "baseline_tokens_per_s": round(rate["baseline"]),
        "ours_tokens_per_s": round(rate["ours"]),
        "speedup": round(ratio, 2),
        "cpu_seconds_ratio": round(cpu_ratio, 2),
        "byte_identical": identical,
        "note": "best of the rounds; wall time of end-to-end commands; other jobs may have shared the machine (see load_average)",
    }
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"bench: wrote {args.results}")
    if not identical:
        raise SystemExit("bench: outputs differ from the baseline's")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _versions(*names):
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    main()
