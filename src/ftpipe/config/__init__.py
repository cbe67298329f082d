"""Stage 1: the one typed configuration, its validation and its self-documenting paths."""

from ftpipe.config.io import config_to_yaml, load_config, save_config
from ftpipe.config.paths import checkpoints_dir, prepared_data_dir, results_root, tb_logs_dir
from ftpipe.config.schema import (
    EMBEDDED_MODEL,
    DataConfig,
    DistConfig,
    LoraConfig,
    ModelConfig,
    PipelineConfig,
    TrainConfig,
)
from ftpipe.config.validate import ConfigError, collect_problems, validate_config

__all__ = [
    "EMBEDDED_MODEL",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "LoraConfig",
    "ModelConfig",
    "PipelineConfig",
    "TrainConfig",
    "checkpoints_dir",
    "collect_problems",
    "config_to_yaml",
    "load_config",
    "prepared_data_dir",
    "results_root",
    "save_config",
    "tb_logs_dir",
    "validate_config",
]
