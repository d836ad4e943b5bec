"""``python -m trainer.tune``: see trainer.tune.cli."""

from __future__ import annotations

if __name__ == "__main__":  # first, while one thread runs: the local Ray cluster dies with this command
    from cluster.lifeline import supervise

    supervise()

from trainer.tune.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
