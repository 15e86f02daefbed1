"""The reduction layer where people train: Accelerate, Lightning (Trainer and Fabric) and the
Hugging Face Trainer, one module each. Each imports its framework lazily and the layer only;
``import ddp_reduce`` imports none of them.

Each knows how its framework scales the loss (Accelerate divides it by its accumulation steps,
Lightning's Trainer by ``accumulate_grad_batches``, the Hugging Face Trainer multiplies it by
the world size under ``average_tokens_across_devices``) and undoes it, so the c the layer
states is the c the optimizer receives; :meth:`ddp_reduce.Reducer.measure` checks it.
"""
