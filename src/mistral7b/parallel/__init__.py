"""Tensor parallelism over torch.distributed: one model split over several GPUs (or CPU processes).

`launch(source, tensor_parallel_size=N)` starts the ranks and returns rank 0's `TensorParallelModel`,
which the engine's runner drives as it drives a `Transformer` (`engine.runner.RunnableModel`).
"""

from .launch import launch
from .runtime import ShardedKVCache, TensorParallelError, TensorParallelModel
from ..weights import check_world_size, local_config

__all__ = ["launch", "TensorParallelModel", "ShardedKVCache", "TensorParallelError", "check_world_size",
           "local_config"]
