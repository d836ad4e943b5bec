"""Training on Ray Train: ``config`` (TrainConfig and the CLI), ``loop`` (the per-worker loop),
``evaluate``, ``checkpoint``, ``tblog``, ``train`` (the driver), ``finetune`` (new sessions,
gradual unfreezing), ``baselines`` and ``logreg`` (the per-session decoders it is judged against).
The network itself lives in ``trainer.model`` and never imports these.
"""
