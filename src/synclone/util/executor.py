"""Where the embarrassingly parallel stages run: this process (``local``) or a Ray cluster (``ray``).

``generate``, ``curate`` (scoring) and ``evaluate`` (logits) accept the same ``executor`` section::

    executor:
      kind: ray              # local (default: today's behaviour) | ray
      address: auto          # auto (a cluster started with `ray start`), ray://host:10001, host:6379,
                             # or null: start a private Ray instance on this machine for the run
      workers: 4             # model replicas (Ray actors); each loads the model once
      gpus_per_worker: 1     # null: 1 when the cluster has GPUs, else 0
      cpus_per_worker: 1
      retries: -1            # restarts of a dead worker and retries of its batch; -1: without limit

The Ray side (connecting, checking resources, turning a Ray failure into one line) lives here so the
three stages share it; each stage's Ray pipeline sits next to its local code
(:mod:`synclone.generate.ray_runner`, :mod:`synclone.curate.ray_scoring`, :mod:`synclone.probes.ray_logits`).
Ray is imported only when ``kind: ray`` is used (the ``cluster`` extra installs it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synclone.errors import UserError

# Seconds to wait for a TCP answer from executor.address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


class ExecutorConfig(BaseModel):
    """The ``executor`` section of the generate, curate and evaluate configs (see the module docstring)."""

    # As synclone.config.StrictModel (a floor above util): unknown keys are errors that name themselves.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    retries: int = Field(-1, ge=-1)

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("executor.kind=ray needs Ray: pip install 'synclone[cluster]' (or 'ray[data]')") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``ray://host:port`` or ``host:port``; ``None`` when the address has no port."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_reachable(address: str) -> None:
    """Fail within seconds, in one line, when nothing listens at ``address`` (Ray itself retries for minutes)."""
    hp = _host_port(address)
    if hp is None:
        raise UserError(f"executor.address '{address}' is not auto, ray://HOST:PORT or HOST:PORT")
    try:
        with socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UserError(
            f"executor.address '{address}': nothing answers at {hp[0]}:{hp[1]} ({err.strerror or err}); start the "
            f"cluster (`ray start --head`) or fix the address (or use executor.kind=local)"
        ) from None


def preflight(cfg: ExecutorConfig) -> None:
    """Checks that need no Ray and take a moment (a reachable address), run before a stage does any work."""
    if cfg.is_ray and cfg.address not in (None, "auto", "local"):
        _check_reachable(cfg.address)


@dataclass
class RaySession:
    """A connected Ray driver and the per-worker resources of this run."""

    cfg: ExecutorConfig
    gpus_per_worker: float
    resources: dict[str, float]

    def map_args(self) -> dict[str, Any]:
        """Keyword arguments of ``Dataset.map_batches`` for a fixed pool of one actor per worker.

        Ray Data restarts a dead actor and retries its batch without limit by default
        (``max_restarts=-1``, ``max_task_retries=-1``); only a finite ``retries`` is passed on.
        """
        import ray.data

        args: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(size=self.cfg.workers),
            "num_cpus": self.cfg.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
        }
        if self.cfg.retries >= 0:
            args.update(max_restarts=self.cfg.retries, max_task_retries=self.cfg.retries)
        return args

    def device(self) -> str:
        """The torch device a worker uses."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def check_resources(cfg: ExecutorConfig, total: dict[str, float], nodes: list[dict[str, float]]) -> float:
    """Refuse (with the numbers) a worker count the cluster cannot hold; returns the GPUs per worker.

    A worker must fit on one node, and ``workers`` of them in the whole cluster; otherwise Ray would
    wait for resources forever.
    """
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    gpw = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    big_cpu = max((n.get("CPU", 0) for n in nodes), default=cpus)
    big_gpu = max((n.get("GPU", 0) for n in nodes), default=gpus)
    if cfg.cpus_per_worker > big_cpu or gpw > big_gpu:
        raise UserError(
            f"a worker needs {cfg.cpus_per_worker:g} CPU(s) and {gpw:g} GPU(s) but the largest node of the Ray "
            f"cluster has {big_cpu:g} CPU(s) and {big_gpu:g} GPU(s): lower executor.cpus_per_worker / "
            f"executor.gpus_per_worker"
        )
    fit = int(cpus // cfg.cpus_per_worker)
    if gpw > 0:
        fit = min(fit, int(gpus // gpw))
    if cfg.workers > fit:
        raise UserError(
            f"executor.workers={cfg.workers} needs {cfg.workers * cfg.cpus_per_worker:g} CPU(s) and "
            f"{cfg.workers * gpw:g} GPU(s) but the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s): "
            f"use executor.workers={max(fit, 1)} or fewer, or add nodes"
        )
    return gpw


# A Ray that synclone starts itself runs a fixed pool of actors (one per worker) and no tasks that need
# a pool of idle workers: Ray's pre-started idle workers would only take CPU from the actors (on two cores,
# 1 -> 2 workers went from 1.54x to 1.73x without them; bench/RESULTS.md). A cluster started with
# `ray start` can do the same with RAY_enable_worker_prestart=0.
LOCAL_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


@contextlib.contextmanager
def ray_session(cfg: ExecutorConfig, progress: bool = False) -> Iterator[RaySession]:
    """Connect to (or start) Ray as ``cfg`` says, check resources, and disconnect afterwards.

    An already initialised Ray driver (e.g. a test's cluster) is used as it is and left running.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        address = cfg.address
        if address not in (None, "auto", "local"):
            _check_reachable(address)
        # Workers log to their own files; the driver shows one progress bar and, on failure, one line.
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                                  "configure_logging": True}
        if address in (None, "local"):
            kwargs["include_dashboard"] = False
            kwargs["_system_config"] = LOCAL_SYSTEM_CONFIG
        try:
            ray.init(address=address if address not in (None, "local") else None, **kwargs)
        except ConnectionError as err:
            raise UserError(f"executor.address '{address}': no Ray cluster found ({str(err).splitlines()[0]}); "
                            f"start one with `ray start --head` or set executor.address") from None
        started = True
    import ray.data

    # Ray Data logs every failure with its stack at ERROR (its own log files keep them); the run ends with
    # one line (a worker's UserError) or a traceback (a bug) instead.
    names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    quiet = {name: logging.getLogger(name).level for name in names}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        gpw = check_resources(cfg, ray.cluster_resources(), [n.get("Resources", {}) for n in alive])

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = False
        # A worker that cannot even start (missing weights on its node) fails the run at once.
        ctx.max_consecutive_actor_init_deaths = 2
        yield RaySession(cfg, gpw, dict(ray.cluster_resources()))
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        if started:
            ray.shutdown()


def node_name() -> str:
    """The node a Ray worker runs on (its IP), for messages that name where something failed."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only used to label a message
        return socket.gethostname()


def user_error_from(err: BaseException) -> UserError | None:
    """The :class:`UserError` a Ray worker raised, dug out of Ray's wrappers (``None`` if there is none)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    text = str(err)
    marker = "synclone.errors.UserError: "
    if marker in text:  # a worker's UserError Ray only kept as text
        return UserError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


@contextlib.contextmanager
def one_line_errors(what: str) -> Iterator[None]:
    """Turn a Ray failure caused by a worker's :class:`UserError` into that one line (exit 2)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        found = user_error_from(err)
        if found is not None:
            raise UserError(str(found)) from None
        raise


def worker_threads(cpus_per_worker: float) -> int:
    """torch threads of a worker: its CPU share (Ray sets OMP_NUM_THREADS the same way)."""
    return max(1, int(cpus_per_worker)) if cpus_per_worker >= 1 else 1


def absolute(path: str | os.PathLike) -> str:
    """An absolute path: workers on other nodes resolve it on the shared filesystem, not our cwd."""
    return os.path.abspath(os.fspath(path))
