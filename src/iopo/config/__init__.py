"""Layer 1, the typed settings of every command: defaults < YAML file < `key.sub=value` overrides, one config per
command composed one level deep of small parts; unknown keys and bad values fail with a message naming the key.

base: the error and the strict part; train: model, data, loss, game, optimizer, `iopo train` / `train-rm`;
evaluation: generation, judges, `generate` / `eval` / `rate` / `plot` / `report`; online: `iopo online`;
loading: reading, overriding, validating and comparing configs.
"""

from iopo.config.base import MAX_STEPS, ConfigError
from iopo.config.evaluation import (
    JUDGE_TYPES,
    EvalConfig,
    GenerateConfig,
    GenerationConfig,
    JudgeConfig,
    JudgeType,
    PlotConfig,
    RateConfig,
    ReportConfig,
)
from iopo.config.loading import changed_settings, dump_config, load_config, parse_overrides
from iopo.config.online import OnlineConfig, OnlineGenerationConfig
from iopo.config.train import (
    DataConfig,
    DistributedConfig,
    INPOConfig,
    IOPOConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RMOptimConfig,
    SPINConfig,
    TrainConfig,
    TrainingParts,
    TrainRMConfig,
    XPOConfig,
)

__all__ = [
    "JUDGE_TYPES",
    "MAX_STEPS",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "GenerateConfig",
    "GenerationConfig",
    "INPOConfig",
    "IOPOConfig",
    "SPINConfig",
    "XPOConfig",
    "JudgeConfig",
    "JudgeType",
    "LossConfig",
    "ModelConfig",
    "OnlineConfig",
    "OnlineGenerationConfig",
    "OptimConfig",
    "PlotConfig",
    "RMOptimConfig",
    "RateConfig",
    "ReportConfig",
    "TrainConfig",
    "TrainRMConfig",
    "TrainingParts",
    "changed_settings",
    "dump_config",
    "load_config",
    "parse_overrides",
]
