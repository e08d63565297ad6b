"""Configuration: the schema (``schema``), config files and ``--set`` (``io``), presets (``presets``).

``from trainer import config as C`` gives the schema and the file functions under one name; importing it is
cheap (no torch).
"""

from trainer.config.io import (apply_dict, apply_overrides, config_to_dict, config_to_toml, default_config,  # noqa: F401
                               dict_to_toml, diff_from_defaults, help_table, load_config, read_toml,
                               validate_for_training)
from trainer.config.schema import (FIELDS, MAX_PRESET_BYTES, PRESET_VERSION, SECTIONS, Config, DataConfig,  # noqa: F401
                                   FieldInfo, LoraConfig, ModelConfig, OutputConfig, SampleConfig, TrainConfig,
                                   check_value, iter_fields, opt, parse_value)
