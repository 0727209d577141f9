"""Pieces every op folder of kernels/ shares (argument handling, packed documents)."""
