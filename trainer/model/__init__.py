"""The network, torch only (no Ray, no training loop): EPhys + OPhys tokens -> latents -> shared trunk
-> multi-task decoder.

One module per part: ``config`` (ModelConfig, TaskSpec), ``rotary`` (rotary time embedding),
``packing`` (index arithmetic of packed batches), ``attention`` (varlen attention over packed batches),
``embeddings`` (unit/session/task tables, calcium value projection), ``layers`` (dropout, feed-forward
net, latent block, cross-attention encoder), ``network`` (the model and its loss), ``counts`` (the count loss),
``likelihood`` (the likelihood readout: units' log-likelihood per class, added to the logits), ``variants`` (the
paper's architecture ablations, ``build_model``), ``io`` (checkpoints and vocabulary growth),
``synthetic`` (fake packed batches for tests and benchmarks).
``from trainer.model import build_model, ModelConfig`` imports torch only when used.
"""

__all__ = ["ModelConfig", "TaskSpec", "build_model"]


def __getattr__(name: str):
    if name in ("ModelConfig", "TaskSpec"):
        from trainer.model import config

        return getattr(config, name)
    if name == "build_model":
        from trainer.model.variants import build_model

        return build_model
    raise AttributeError(f"module 'trainer.model' has no attribute {name!r}")
