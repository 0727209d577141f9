from .conv1d import causal_conv1d
from .naive import naive_causal_conv1d

__all__ = ["causal_conv1d", "naive_causal_conv1d"]
