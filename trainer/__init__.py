"""LoRA Studio's engine: config, model loading, LoRA injection, the training loop, LoRA files, generation.

Importing this package is cheap (no torch); heavy modules load on first use.
"""

__version__ = "0.1.0"


def train(config, on_event=None, should_stop=None):
    """The one way to train: see trainer.training.train."""
    from .training import train as _train
    return _train(config, on_event=on_event, should_stop=should_stop)
