"""The experiment's typed configuration: one YAML file, every key checked with its range.

``schema`` declares the sections and their cross-checks, ``typed`` turns YAML into those
dataclasses (type and range errors name the key), ``untrusted`` bounds what is read from a
user's file, and ``schedule`` is the learning rate the config asks for at each step. Nothing
here imports the rest of ldmkit: every other package reads the config.
"""

from ldmkit.config.schema import (
    SAMPLERS,
    AutoencoderConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    DiTConfig,
    SampleConfig,
    TrainConfig,
    UNetConfig,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)
from ldmkit.config.typed import check_flag

__all__ = ["SAMPLERS", "AutoencoderConfig", "Config", "DataConfig", "DiTConfig", "DiffusionConfig",
           "SampleConfig", "TrainConfig", "UNetConfig", "check_flag", "from_dict", "load_config",
           "to_dict", "to_yaml"]
