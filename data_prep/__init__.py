"""data_prep: corpora -> SentencePiece tokenizer -> megatron-core indexed datasets (.bin/.idx), blends.

Commands (python -m data_prep COMMAND --help):
  train-tokenizer  --input PATHS_OR_GLOBS --vocab-size N --output DIR [--model-type bpe|unigram]
  tokenize         --input PATHS_OR_GLOBS --tokenizer MODEL --output-prefix PREFIX --workers N
                   [--valid-fraction F] [--one-output-per-input] [--strict] [--overwrite|--resume]
                   [--num-shards N --shard-index I]  (with --one-output-per-input: one Slurm array task's share)
  list-inputs      --input PATHS_OR_GLOBS
  default-corpus   --output DIR [--vocab-size 8192]
  blend            --datasets PREFIX_OR_GLOB ... [--weights W ...] [--valid-datasets ...] [--output FILE]

Files pretraining reads (all JSON written last, under a temporary name then renamed):

PREFIX.json, beside PREFIX.bin / PREFIX.idx (megatron-core's IndexedDataset(PREFIX) reads those):
  prefix, split ("all", "train" or "valid"), documents, tokens, dtype ("uint16" or "int32"),
  tokenizer_model (absolute path), tokenizer_type ("sentencepiece" or "huggingface"), tokenizer_sha256,
  vocab_size, eod_id (ends every document), pad_id (null if none), valid_fraction, split_seed,
  inputs, json_key, text_document, skipped_lines ({input path: {reason: count}}), created, version.

DIR/tokenizer_meta.json, beside a tokenizer.model that train-tokenizer wrote:
  type, model_type, vocab_size, unk_id, bos_id, eos_id, pad_id, eod_id (= eos_id),
  unk_token, bos_token, eos_token, pad_token, byte_fallback, normalization, add_dummy_prefix,
  trained_on {documents, bytes}. tokenizer_config.json / special_tokens_map.json let transformers
  load the directory as a LlamaTokenizer.

DIR/manifest.json of default-corpus: tokenizer_model, train_prefix, valid_prefix, vocab_size, eod_id,
  pad_id, documents {train, valid}, tokens {train, valid}, source, files, bytes, valid_fraction, seconds.

FILE of blend --output: train_prefixes, train_weights (normalised), valid_prefixes, valid_weights (with
  --valid-datasets, and valid_tokens), tokenizer_model, tokenizer_sha256, vocab_size, eod_id, pad_id; prefixes, weights,
  tokens (the training part again, under the names of a plain blend).
"""
