"""A user's own package, outside ddp_reduce, trained through ``ddp-reduce``:

    PYTHONPATH=examples ddp-reduce +model._target_=userpkg.nets.Classifier +model.width=32 \\
        +data._target_=userpkg.data.make_splits +data.kwargs.n_train=1024 dist.nproc=2
"""
