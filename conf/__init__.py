"""Hydra configs of ddp_reduce, installed as the package ddp_reduce.conf."""
