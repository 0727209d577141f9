"""The training program; see pretrain/train.py."""
