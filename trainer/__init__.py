"""The multi-modal shared-trunk model (EPhys + OPhys -> latents -> shared trunk -> multi-task decoder).

One module per part: ``config`` (ModelConfig, TaskSpec), ``rotary`` (rotary time embedding),
``attention`` (varlen attention over packed batches), ``embeddings`` (unit/session/task tables,
calcium value projection), ``model`` (the model, loss, accuracy, checkpoints), ``ablations``
(the paper's architecture variants, ``build_model``). ``from trainer import build_model,
ModelConfig`` works without importing torch until used.
"""

__all__ = ["ModelConfig", "TaskSpec", "build_model"]


def __getattr__(name: str):
    if name in ("ModelConfig", "TaskSpec"):
        from trainer import config

        return getattr(config, name)
    if name == "build_model":
        from trainer.ablations import build_model

        return build_model
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
