"""Process-wide settings in one place: seeds, threads, device, precision and the
distributed process group (from the environment ``torchrun`` sets). Logged at start."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import random
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from cait.kernels.native import available as native_available
from cait.threads import ensure_policy, use_threads

__all__ = [
    "Amp",
    "Device",
    "DeviceType",
    "DistInfo",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "DTYPES",
    "autocast",
    "dist_info",
    "distributed",
    "get_rng_state",
    "init_distributed",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "setup",
    "shutdown_distributed",
    "torchrun_command",
]

logger = logging.getLogger(__name__)

# The closed sets of the runtime settings, defined once (configs and the CLI read them).
DeviceType = Literal["cpu", "cuda"]
Device = Literal["auto", DeviceType]  # auto: CUDA when present
Amp = Literal["none", "bf16", "fp16"]  # autocast dtype, or none for full fp32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def inference_device(device: str, amp: Amp) -> torch.device:
    """The device for evaluation or prediction, checking the AMP mode (no reseeding); on
    the way, the process gets a thread policy if it has none (:mod:`cait.threads`)."""
    ensure_policy()
    dev = resolve_device(device)
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device (use 'bf16' on the CPU)")
    return dev


def setup(
    seed: int, device: Device, amp: Amp, threads: int | None = None, local_rank: int = 0
) -> torch.device:
    """Seed every RNG, set threads and matmul precision, check the AMP mode; log it all.

    Under ``torchrun`` a CUDA process takes the GPU of its ``local_rank``.
    """
    use_threads(threads)  # pinned, or following other processes' load (cait.threads)
    dev = inference_device(device, amp)
    if dev.type == "cuda" and dist_info().world_size > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    # full fp32 matmuls unless AMP is asked for: results must not depend on TF32 defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed_everything(seed)
    logger.info(
        "runtime: python %s, torch %s, device %s, amp %s, threads %d now, seed %d, TF32 off%s",
        platform.python_version(),
        torch.__version__,
        dev,
        amp,
        torch.get_num_threads(),
        seed,
        f", talking heads in {'C++' if native_available() else 'Python'}"
        if dev.type == "cpu"
        else "",
    )
    return dev


# Precision names (``--dtype``, ``--amp``) and their torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Amp) -> torch.autocast:
    dtype = DTYPES.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


def get_rng_state() -> dict:
    """Every RNG's state as tensors and plain containers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Take back the states :func:`get_rng_state` gave; one that is not of that form (a
    checkpoint's, from elsewhere) is a ``ValueError``."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ValueError(f"the checkpoint's RNG state is malformed ({err!r})") from None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: one process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """The initialised process group's rank and size (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str, timeout_s: float) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL for CUDA, gloo on the CPU. Without
    ``WORLD_SIZE > 1`` nothing happens. ``timeout_s`` bounds every collective, so a rank that
    waits for a dead peer fails instead of hanging. Ranks other than 0 log warnings only.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _worker_group_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            rank = int(os.environ["RANK"])
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
    info = dist_info()
    if not info.is_main:
        logging.getLogger("cait").setLevel(logging.WARNING)
    logger.info(
        "distributed: %d processes, backend %s, collective timeout %.0f s",
        info.world_size,
        dist.get_backend(),
        timeout_s,
    )
    return info


# The key in torchrun's agent store under which rank 0 publishes its worker group's store.
_GROUP_STORE_KEY = "cait/worker_group_store"
_TOKEN_KEY = "cait/token"
_CONNECT_TRY_S = 3.0  # one try to reach a published store before reading the key again


def _worker_group_store(timeout: datetime.timedelta) -> dist.Store | None:
    """A store of this worker group's own when ``torchrun`` shares its agent's store (None:
    ``init_process_group``'s own ``env://`` rendezvous is safe).

    Since torch 2.5 the c10d rendezvous hands every worker group the agent's store
    (``TORCHELASTIC_USE_AGENT_STORE``), and that store outlives a ``--max-restarts`` restart
    with the previous group's keys in it: a restarted group reads its dead predecessors' gloo
    addresses (or NCCL ids) and fails to connect (pytorch/pytorch#135712). The restart count
    cannot tell the groups apart, as each agent counts its own restarts. So rank 0 hosts a
    fresh store on a free port and publishes the port and a random token in the agent's
    store; the other ranks connect to it, reading the key again while what they find is a
    predecessor's (nobody listens there any more, or the token does not match).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host, rank = os.environ["MASTER_ADDR"], int(os.environ["RANK"])
    agent = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if rank == 0:
        token = secrets.token_hex(16)
        own = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        own.set(_TOKEN_KEY, token)
        agent.set(_GROUP_STORE_KEY, f"{own.port} {token}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    try_for = datetime.timedelta(seconds=_CONNECT_TRY_S)
    while True:
        port, token = agent.get(_GROUP_STORE_KEY).decode().split()
        try:
            own = dist.TCPStore(host, int(port), is_master=False, timeout=try_for)
            if own.check([_TOKEN_KEY]) and own.get(_TOKEN_KEY).decode() == token:
                own.set_timeout(timeout)
                return own
        except RuntimeError:  # DistNetworkError: a dead predecessor's port
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank}: rank 0's store (published in torchrun's store at "
                f"{host}:{os.environ['MASTER_PORT']}) did not answer within "
                f"{timeout.total_seconds():.0f} s"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def distributed(device: str, timeout_s: float) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the length of a ``with`` block; the process group is
    destroyed at the end only if this block created it."""
    joins = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    info = init_distributed(device, timeout_s)
    try:
        yield info
    except BaseException:
        if joins:  # no barrier: the peers may never arrive; torchrun stops them
            shutdown_distributed()
        raise
    if joins:
        # gloo torn down while a peer still talks to it aborts that peer now and then
        # ("terminate called without an active exception"): leave together
        dist.barrier()
        shutdown_distributed()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op on one process); returns it."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all ranks, in place; returns it."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    info = dist_info()
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """The single-machine ``torchrun`` command that runs ``python -m cait ARGS`` on
    ``nproc`` processes (``--standalone``: a local rendezvous on a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cait",
        *module_args,
    ]
