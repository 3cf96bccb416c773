"""Training infrastructure shared by the ``mpvg`` subcommands.

- :mod:`.config`: the training configuration (:class:`~.config.TrainConfig`), YAML recipes and overrides.
- :mod:`.checkpoint`: checkpoints that load with ``torch.load(weights_only=True)``; rebuilding a model from one.
- :mod:`.distributed`: ``torchrun`` / DistributedDataParallel set-up and samplers.
- :mod:`.schedule`: warmup + cosine learning-rate schedule.
- :mod:`.ema`: exponential moving average of the weights.
- :mod:`.logging`: JSONL metrics and the training-curve PNG.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (missing data, bad option, corrupt checkpoint).

    The ``mpvg`` command prints its message without a traceback and exits with status 2.
    """
