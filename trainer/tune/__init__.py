"""Sweeps: the papers' experiments as Ray Tune experiments over trainer.train and trainer.finetune.

``spec`` (the experiment file), ``heldout`` (held-out sessions), ``points`` (the crossed axes), ``trial``
(the function trainable), ``sweep`` (the Tuner), ``results`` (results.parquet), ``report`` (results.md
and plots), ``hparams`` (TensorBoard), ``cli`` (``python -m trainer.tune``). docs/sweeps.md.
"""
