"""ddp_reduce: sum or mean? The gradient reduction of data-parallel training, made explicit."""

__version__ = "0.1.0"
