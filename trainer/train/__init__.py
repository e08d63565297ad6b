"""The training recipe (``recipe.train``) and its parts: data and caches (``data``), optimizers and schedules
(``optim``), resumable checkpoints (``checkpoint``), typed progress events (``events``)."""
