"""The Hugging Face model of an export (configuration_kla, modeling_kla: shipped into every exported folder) and what
writes it (shipped_code, tokenizer, convert); kla_megatron/export_hf.py is the command."""
