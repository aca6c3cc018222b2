"""Executors: one ``concurrent.futures``-style interface, three backends.

- :class:`SerialExecutor` (``serial``, the default): tasks run one after the other in this
  process, each when the coordinator asks for the next finished one (so results are written as
  they finish, exactly as with the other backends).
- :class:`LocalExecutor` (``local``): a process pool of ``workers`` processes on this machine
  (``spawn`` start method: a clean interpreter per worker, whatever threads the coordinator has).
- :class:`DaskExecutor` (``dask``): a Dask ``distributed`` cluster (the ``[distributed]``
  extra): the scheduler at ``scheduler`` (``tcp://host:8786``; ``dask-jobqueue`` or any other
  deployment), or a ``LocalCluster`` of ``workers`` single-threaded processes on 127.0.0.1 when
  no address is given. With a remote cluster, the dataset and the run directory must be on a
  filesystem the workers see at the same paths.

Every backend runs the same task function on the same inputs; results never depend on the
backend (tested). The method is instantiated and ``load()``-ed once per worker process
(:func:`worker_method`), and worker processes limit OpenMP/MKL/OpenBLAS (and torch, when the
method uses it) to one thread each, so ``N`` workers use ``N`` cores.

This module imports neither numpy nor the method at import time, so the thread limits a worker
sets take effect before any numerical library starts its thread pools.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from .methods.api import Method

__all__ = [
    "BACKENDS",
    "DaskExecutor",
    "Executor",
    "LocalExecutor",
    "MethodSpec",
    "SerialExecutor",
    "limit_threads",
    "make_executor",
    "worker_init",
    "worker_method",
]

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("serial", "local", "dask")

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")


# --------------------------------------------------------------------------------------------
# the method, as shipped to workers


@dataclass(frozen=True)
class MethodSpec:
    """How a worker gets its method: picklable, instantiated once per worker process.

    Exactly one source is used, in this order: ``instance`` (a method object; each worker gets a
    pickled copy), ``factory`` (a :class:`Method` subclass, importable by the workers), or the
    registry ``name`` (an entry point of the ``cmbbench.methods`` group).

    Attributes
    ----------
    name
        Registry name (or the class's ``name`` for objects passed directly).
    params
        Constructor keyword arguments.
    key
        Identifies this run's method in a worker's cache (a fresh one per spec).
    """

    name: str
    params: dict = field(default_factory=dict)
    factory: type | None = None
    instance: Any = None
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    def instantiate(self) -> Method:
        if self.instance is not None:
            return self.instance
        if self.factory is not None:
            return self.factory(**self.params)
        from .methods.registry import load_method

        return load_method(self.name, **self.params)


_STATE: dict[str, Method] = {}
_STATE_LOCK = threading.Lock()
_THREADPOOL_LIMITS: list = []  # keep threadpoolctl's limiter alive


def limit_threads(n: int = 1, *, torch: bool | None = None) -> None:
    """Limit this process's numerical thread pools to ``n`` threads.

    Sets the OpenMP/MKL/OpenBLAS environment variables (effective for libraries not yet
    loaded), applies ``threadpoolctl`` limits when it is installed (effective for loaded ones),
    and calls ``torch.set_num_threads(n)`` when torch is already imported (or ``torch=True`` and
    it is importable). torch is never imported just to be limited.
    """
    for var in _THREAD_ENV:
        os.environ[var] = str(n)
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits

            _THREADPOOL_LIMITS.append(threadpool_limits(limits=n))
        except Exception:  # noqa: BLE001 - optional, best effort
            log.debug("threadpoolctl limits not applied", exc_info=True)
    if torch or (torch is None and "torch" in sys.modules):
        try:
            import torch as _torch

            _torch.set_num_threads(n)
        except Exception:  # noqa: BLE001 - not installed, or already configured
            log.debug("torch threads not limited", exc_info=True)


def worker_method(spec: MethodSpec, *, threads: int | None = None) -> Method:
    """The method of ``spec`` in this worker process: instantiated and ``load()``-ed on first use,
    then reused for every scan (the cache holds one method: a new run replaces it)."""
    with _STATE_LOCK:
        method = _STATE.get(spec.key)
        if method is None:
            needs_torch = bool(getattr(getattr(spec.factory or type(spec.instance), "requirements",
                                               None), "torch", False))
            if threads:
                limit_threads(threads, torch=needs_torch or None)
            method = spec.instantiate()
            method.load()
            if threads:  # load() may have imported torch or numpy
                limit_threads(threads)
            _STATE.clear()
            _STATE[spec.key] = method
            log.debug("loaded method %s in process %d", spec.name, os.getpid())
        return method


def worker_init(spec_blob: bytes, threads: int | None = 1) -> None:
    """Worker initializer: limit threads, then instantiate and ``load()`` the method.

    ``spec_blob`` is a pickled :class:`MethodSpec`: unpickling it may import the method's
    modules (and numpy), so it is done after the thread limits are set. It never raises: a
    method that fails to load fails every scan's task with its own error message (a raising
    initializer would break the whole process pool instead).
    """
    if threads:
        limit_threads(threads)
    try:
        worker_method(pickle.loads(spec_blob), threads=threads)
    except Exception:
        log.debug("method failed to load in process %d", os.getpid(), exc_info=True)


# --------------------------------------------------------------------------------------------
# executors


class Executor(ABC):
    """A pool that runs tasks and hands back their futures as they finish.

    Use it as a context manager (or call :meth:`start` and :meth:`shutdown`)::

        with make_executor("local", workers=2) as ex:
            futures = [ex.submit(fn, item) for item in items]
            for fut in ex.as_completed(futures):
                fut.result()

    ``submit`` returns a future whose ``result()`` returns the task's value or raises its
    exception; ``as_completed`` yields the given futures in completion order.
    """

    backend: ClassVar[str] = ""

    def __init__(self, *, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigurationError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.started = False

    def start(self, initializer: Callable[..., None] | None = None,
              initargs: tuple = ()) -> Executor:
        """Start the workers; ``initializer(*initargs)`` runs once in each worker process."""
        if not self.started:
            self._start(initializer, initargs)
            self.started = True
        return self

    @abstractmethod
    def _start(self, initializer: Callable[..., None] | None, initargs: tuple) -> None: ...

    @abstractmethod
    def submit(self, fn: Callable, /, *args: Any) -> Any:
        """Schedule ``fn(*args)``; returns a future."""

    @abstractmethod
    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        """Yield ``futures`` as they finish."""

    def shutdown(self, *, cancel: bool = False) -> None:
        """Stop the workers (``cancel``: drop tasks not yet started)."""
        self.started = False

    def describe(self) -> dict:
        """Backend name and worker count, recorded with a run."""
        return {"backend": self.backend, "workers": self.workers}

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.shutdown(cancel=exc is not None)


class SerialExecutor(Executor):
    """Runs each task in this process, when :meth:`as_completed` reaches it (in submit order)."""

    backend = "serial"

    def __init__(self, *, workers: int | None = None) -> None:
        if workers not in (None, 1):
            raise ConfigurationError("--workers needs --backend local or dask (the serial "
                                     "backend runs one scan at a time)")
        super().__init__(workers=1)
        self._pending: dict[int, tuple[Callable, tuple]] = {}

    def _start(self, initializer: Callable[..., None] | None, initargs: tuple) -> None:
        self._init = (initializer, initargs)

    def submit(self, fn: Callable, /, *args: Any) -> Future:
        fut: Future = Future()
        self._pending[id(fut)] = (fn, args)
        return fut

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        for fut in futures:
            job = self._pending.pop(id(fut), None)
            if job is not None and fut.set_running_or_notify_cancel():
                fn, args = job
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    fut.set_exception(exc)
            yield fut

    def shutdown(self, *, cancel: bool = False) -> None:
        self._pending.clear()
        super().shutdown(cancel=cancel)


class LocalExecutor(Executor):
    """A process pool on this machine (``workers`` processes, default: the CPU count)."""

    backend = "local"

    def __init__(self, *, workers: int | None = None, mp_context: str = "spawn") -> None:
        super().__init__(workers=workers)
        self.workers = workers or os.cpu_count() or 1
        self.mp_context = mp_context
        self._pool = None

    def _start(self, initializer: Callable[..., None] | None, initargs: tuple) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                         mp_context=multiprocessing.get_context(self.mp_context),
                                         initializer=initializer, initargs=initargs)

    def submit(self, fn: Callable, /, *args: Any) -> Future:
        if self._pool is None:
            self.start()
        return self._pool.submit(fn, *args)

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        from concurrent.futures import as_completed

        yield from as_completed(list(futures))

    def shutdown(self, *, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        super().shutdown(cancel=cancel)


class DaskExecutor(Executor):
    """A Dask ``distributed`` cluster: the scheduler at ``scheduler``, or a ``LocalCluster`` of
    ``workers`` single-threaded worker processes bound to 127.0.0.1 when none is given."""

    backend = "dask"

    def __init__(self, *, workers: int | None = None, scheduler: str | None = None,
                 connect_timeout_s: float = 30.0) -> None:
        super().__init__(workers=workers)
        if scheduler and workers:
            raise ConfigurationError("--workers applies to the LocalCluster started when no "
                                     "--scheduler is given; a scheduler has its own workers")
        self.scheduler = scheduler
        self.connect_timeout_s = connect_timeout_s
        self._client = None
        self._cluster = None

    @staticmethod
    def _import() -> Any:
        try:
            import distributed
        except ImportError:
            raise ConfigurationError(
                "the dask backend needs the [distributed] extra: "
                "pip install 'cmbbench[distributed]'") from None
        return distributed

    def _start(self, initializer: Callable[..., None] | None, initargs: tuple) -> None:
        distributed = self._import()
        if self.scheduler:
            try:
                self._client = distributed.Client(self.scheduler,
                                                  timeout=f"{self.connect_timeout_s}s")
            except (OSError, TimeoutError) as exc:
                raise ConfigurationError(f"cannot connect to the Dask scheduler "
                                         f"{self.scheduler} ({exc})") from None
        else:
            n = self.workers or os.cpu_count() or 1
            self.workers = n
            self._cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.WARNING,
                # no dashboard; its HTTP endpoint on a free loopback port, never a fixed one
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            self._client = distributed.Client(self._cluster)
        if initializer is not None:
            # once on every worker present now; a worker that joins later initialises lazily
            self._client.run(initializer, *initargs)

    def submit(self, fn: Callable, /, *args: Any) -> Any:
        if self._client is None:
            self.start()
        return self._client.submit(fn, *args, pure=False,
                                   key=f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}")

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        distributed = self._import()
        yield from distributed.as_completed(list(futures))

    def describe(self) -> dict:
        n = self.workers
        if self._client is not None and self.scheduler:
            try:
                n = len(self._client.scheduler_info().get("workers", {}))
            except Exception:  # noqa: BLE001 - informative only
                log.debug("cannot count the Dask workers", exc_info=True)
        return {"backend": self.backend, "workers": n,
                "scheduler": self.scheduler or "LocalCluster"}

    def shutdown(self, *, cancel: bool = False) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        super().shutdown(cancel=cancel)


def make_executor(backend: str = "serial", *, workers: int | None = None,
                  scheduler: str | None = None) -> Executor:
    """The executor of ``backend`` (``serial``, ``local`` or ``dask``).

    Raises
    ------
    ConfigurationError
        Unknown backend, ``--scheduler`` without the dask backend, ``--workers`` with the serial
        backend, or fewer than one worker.
    """
    if backend not in BACKENDS:
        raise ConfigurationError(f"unknown backend {backend!r}; available backends: "
                                 f"{', '.join(BACKENDS)}")
    if scheduler and backend != "dask":
        raise ConfigurationError("--scheduler needs --backend dask")
    if backend == "serial":
        return SerialExecutor(workers=workers)
    if backend == "local":
        return LocalExecutor(workers=workers)
    return DaskExecutor(workers=workers, scheduler=scheduler)
