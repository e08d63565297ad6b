"""LoRA Studio's engine: config, model loading, LoRA injection, the training loop, LoRA files, generation.

Importing this package is cheap (no torch); heavy modules load on first use.
"""

__version__ = "0.1.0"


def train(config, on_event=None, should_stop=None):
    """The one way to train: see trainer.train.recipe.train."""
    from trainer.train.recipe import train as _train
    return _train(config, on_event=on_event, should_stop=should_stop)


def _quiet_known_noise() -> None:
    """Drop a warning that every run would print: we deliberately use Pillow image processors (no torchvision)."""
    import logging

    class _NoTorchvisionFallback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallback())


_quiet_known_noise()
