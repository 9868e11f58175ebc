"""Starting the ranks: spawned by `launch` itself, or already running under torchrun.

Spawned: rank 0 is the calling process, ranks 1..N-1 are `torch.multiprocessing` spawn children
that meet rank 0 through a FileStore in a private temporary folder. Under torchrun (WORLD_SIZE,
RANK and LOCAL_RANK set) every process calls `launch`; rank 0 gets the model back, the others serve
it and exit when it closes. NCCL on CUDA, gloo on CPU; NVLink multicast is kept off everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import ModelConfig, ModelLoadError
from ..loading import open_checkpoint
from ..quant.config import QuantConfig
from ..weights import check_world_size
from .loading import load_shard, random_shard
from .runtime import DTYPES, Link, TensorParallelModel, Worker
from .shard import install_collectives
from .startup import Steps, StartupError, Watch

# Workers wait for the next command this long; a dead rank fails the wait at once (closed socket).
IDLE_TIMEOUT = timedelta(days=365)
START_TIMEOUT_S = 60.0  # each start-up step; loading may take longer while it makes progress
ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a rank needs to join, sent to spawned workers (plain values only)."""

    source: str
    world: int
    store_path: str | None  # the FileStore of spawned ranks; None under torchrun (env://)
    device_type: str
    device_index: int
    dtype: int  # index into runtime.DTYPES
    head: str
    timeout_s: float
    threads: int | None
    start_timeout_s: float = START_TIMEOUT_S
    quant: QuantConfig | None = None  # as for load_model
    random_config: dict | None = None  # random weights at this shape instead of a checkpoint

    def device(self, local_rank: int) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", self.device_index + local_rank)
        return torch.device(self.device_type)


def set_environment() -> None:
    os.environ.update(ENVIRONMENT)


def connect(spec: LaunchSpec, rank: int, local_rank: int, processes=()) -> tuple[Link, object]:
    """Join the default group (NCCL or gloo, collectives under the launch timeout) and the command
    group, and meet at a first collective; return the link and the start-up store (None: torchrun).

    Spawned ranks meet through a FileStore, whose waits end after the start timeout; rank 0 enters
    the rendezvous once every worker has (`startup.Watch`), so a worker that died or hangs while
    starting fails the launch by name instead of blocking it."""
    device = spec.device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rendezvous: dict = {"init_method": "env://"}
    store = None
    if spec.store_path is not None:
        store = dist.FileStore(spec.store_path, spec.world)
        store.set_timeout(timedelta(seconds=spec.start_timeout_s))
        rendezvous = {"store": store}
    steps, watch = Steps(store, rank), Watch(store, processes, spec.start_timeout_s)
    step = "rendezvous"
    try:
        if rank == 0 and store is not None:
            watch.until(step)
        steps.enter(step)
        dist.init_process_group(
            backend, rank=rank, world_size=spec.world, timeout=timedelta(seconds=spec.timeout_s),
            device_id=device if device.type == "cuda" else None, **rendezvous,
        )
        commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        step = "first collective"
        if rank == 0 and store is not None:
            watch.until(step)
        steps.enter(step)
        dist.barrier(group=commands)
    except StartupError:
        raise
    except Exception as e:
        if rank == 0 and store is not None:
            reason = (str(e).strip().splitlines() or [""])[0]
            raise StartupError(f"tensor-parallel start-up failed during step '{step}' ({type(e).__name__}: "
                               f"{reason}); {watch.where()}") from None
        raise
    steps.enter("loading")
    return Link(rank, spec.world, device, commands, spec.timeout_s), store


def load_everywhere(spec: LaunchSpec, link: Link, store=None, processes=()):
    """Every rank loads its shard; a failure on any rank is raised on rank 0 (ModelLoadError), and
    on every rank under torchrun. Spawned workers report to rank 0 through the store."""
    steps = Steps(store, link.rank)
    shard = config = error = None
    try:
        args = (link.rank, spec.world, dist.group.WORLD, link.device, DTYPES[spec.dtype], spec.head)
        if spec.random_config is not None:
            shard, config = random_shard(ModelConfig.from_dict(spec.random_config), *args)
        else:
            shard, config = load_shard(spec.source, *args, quant=spec.quant, on_tensor=steps.tick)
        install_collectives(shard, dist.group.WORLD)
    except ModelLoadError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - reported on rank 0 as a load error
        error = f"{spec.source}: rank {link.rank} could not load its shard ({type(e).__name__}: {e})"
    if store is None:  # torchrun: every rank learns every outcome
        errors: list[str | None] = [None] * spec.world
        dist.all_gather_object(errors, error, group=link.commands)
    elif link.rank:
        steps.finish(error)
        errors = [error]
    else:
        outcomes = Watch(store, processes, spec.start_timeout_s).outcomes()
        errors = [error] + [None if o == "ok" else o for o in outcomes]
    first = next((e for e in errors if e), None)
    if first is not None:
        raise ModelLoadError(first)
    return shard, config


def worker_main(spec: LaunchSpec, rank: int, local_rank: int, parent: int | None) -> None:
    """A worker rank's whole life: join, load, serve, leave. Exits non-zero on any failure."""
    set_environment()
    # tqdm's default lock is a multiprocessing semaphore, which os._exit below never releases: every
    # launch then ended with "resource_tracker: ... leaked semaphore objects" on the user's terminal.
    tqdm.set_lock(threading.RLock())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    code = 0
    try:
        link, store = connect(spec, rank, local_rank)
        try:
            shard, _ = load_everywhere(spec, link, store)
            Worker(link, shard).serve()
        except ModelLoadError:
            pass  # rank 0 reports it
        finally:
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the worker's last words; rank 0 reports the exit
        print(f"mistral7b tensor-parallel rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: nothing is left to flush, and it can block on NCCL


def _exit_with_parent(parent: int) -> None:
    """A spawned worker whose rank 0 vanished (killed outright) must not outlive it."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def launch(source, tensor_parallel_size: int, device=None, dtype: torch.dtype | None = None,
           head: str = "replicated", timeout_s: float = 120.0, threads: int | None = None,
           quant: QuantConfig | None = None, start_timeout_s: float = START_TIMEOUT_S) -> TensorParallelModel:
    """Load `source` sharded over `tensor_parallel_size` ranks; return rank 0's model.

    `source` is a checkpoint (as for `load_model`), or a ModelConfig for random weights (benchmarks).
    `timeout_s` bounds every collective after start-up (NCCL's watchdog or gloo's own timeout);
    `head` is "replicated" or "vocab" (the output projection split by vocabulary). On CPU each
    spawned worker uses `threads` torch threads (default: the cores shared out evenly)."""
    set_environment()
    gc.collect()  # a model closed earlier may still sit in a reference cycle: free its memory first
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    random_config = source.to_dict() if isinstance(source, ModelConfig) else None
    config = source if random_config is not None else None
    if config is None:
        checkpoint = open_checkpoint(source)  # bad paths and formats fail here, before any process starts
        config = checkpoint.config
    check_world_size(config, tensor_parallel_size, head)
    if dist.is_initialized() and _torchrun_world() is None:
        raise RuntimeError("a tensor-parallel model is already running in this process; close() it first")
    world = _torchrun_world()
    if world is not None:
        return _join_torchrun(str(source), world, tensor_parallel_size, device, dtype, head, timeout_s, quant, random_config)
    if threads is None and device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // tensor_parallel_size)
    folder = tempfile.mkdtemp(prefix="mistral7b-tp-")
    spec = LaunchSpec(str(source), tensor_parallel_size, str(Path(folder, "store")), device.type,
                      device.index or 0, DTYPES.index(dtype), head, timeout_s, threads, start_timeout_s,
                      quant, random_config)
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(spec, r, r, os.getpid()), name=f"mistral7b-tp{r}")
                 for r in range(1, tensor_parallel_size)]
    with _script_hidden():
        for p in processes:
            p.start()
    cleanup = lambda: shutil.rmtree(folder, ignore_errors=True)  # noqa: E731
    return _start_rank0(spec, processes, cleanup)


@contextlib.contextmanager
def _script_hidden():
    """Workers need nothing from the caller's script, but spawn re-runs it in each of them unless it
    is guarded by `if __name__ == "__main__"` (building its models again, then failing to launch):
    while they start, the script's path and spec are hidden from multiprocessing."""
    main = vars(sys.modules.get("__main__") or contextlib)  # (no __main__: hide nothing that matters)
    saved = {k: main[k] for k in ("__file__", "__spec__") if k in main}
    main.pop("__file__", None)
    main["__spec__"] = None
    try:
        yield
    finally:
        main.pop("__spec__")
        main.update(saved)


def _start_rank0(spec: LaunchSpec, processes, cleanup) -> TensorParallelModel:
    """Rank 0's start-up; on any failure every worker is stopped before the error is raised."""
    try:
        link, store = connect(spec, 0, 0, processes)
        shard, config = load_everywhere(spec, link, store, processes)
    except BaseException:
        _stop_all(processes, cleanup)
        raise
    model = TensorParallelModel(shard, config, link, processes, on_close=cleanup)
    reference = weakref.ref(model)
    atexit.register(lambda: reference() is not None and reference().close())
    return model


def _stop_all(processes, cleanup) -> None:
    """Kill the workers at once (one may hang or be stopped), reap them, leave the group."""
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()
    if dist.is_initialized():
        dist.destroy_process_group()
    cleanup()


def _torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or any env:// launcher) with several ranks."""
    if all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")):
        world = int(os.environ["WORLD_SIZE"])
        return world if world > 1 else None
    return None


def _join_torchrun(source, world, tensor_parallel_size, device, dtype, head, timeout_s, quant, random_config):
    if world != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} differs from torchrun's WORLD_SIZE {world}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    spec = LaunchSpec(source, world, None, device.type, 0, DTYPES.index(dtype), head, timeout_s, None,
                      quant=quant, random_config=random_config)
    if rank == 0:
        return _start_rank0(spec, [], lambda: None)
    worker_main(spec, rank, local_rank, parent=None)  # never returns: a worker's script ends with the model
