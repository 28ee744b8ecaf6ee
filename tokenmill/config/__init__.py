"""Engine configuration: the user-facing `EngineArgs` and the frozen `EngineConfig` it resolves to."""

from tokenmill.config.engine_args import EngineArgs, engine_args_from_kwargs
from tokenmill.config.engine_config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

__all__ = ["CacheConfig", "EngineArgs", "EngineConfig", "KernelConfig", "ModelConfig", "ParallelConfig",
           "SchedulerConfig", "engine_args_from_kwargs"]
