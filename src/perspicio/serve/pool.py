"""A bounded pool of worker processes for the app's heavy work.

Each worker is a separate process (``spawn``: a fresh interpreter, no state copied from the
server) that loads each model once and keeps it, and runs one job at a time with
``torch.set_num_threads(cores // workers)``. Jobs wait in one bounded queue; a job submitted to a
full queue raises :class:`Busy` (the app answers 503 with ``Retry-After``). Each job has a time
limit counted from the moment its worker starts it; a job over its limit, or cancelled while
running, has its worker process killed and replaced - a computation inside torch cannot be
interrupted any other way, and a killed process cannot leave a half-changed model behind.

Why processes and not threads: requests must not depend on each other (perspicio's per-model lock
would serialise threads sharing a model anyway), a runaway job must be stoppable, and the memory a
job allocated is returned when its worker is replaced.

``spawn`` re-imports the parent's ``__main__`` in each worker: a script that creates a pool must
do so under ``if __name__ == "__main__":`` (the ``perspicio`` command and ``python -c`` need nothing).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

TERMINAL = ("done", "error", "cancelled")


class Busy(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s.")
        self.retry_after = retry_after


class Job:
    """One unit of work: its state, the events seen so far (progress, result) and their listeners."""

    def __init__(self, kind: str, payload: dict[str, Any], time_limit: float) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.payload = payload
        self.time_limit = time_limit
        self.state = "queued"
        self.result: dict[str, Any] | None = None
        self.status = 200
        self.message = ""
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.events: list[dict[str, Any]] = [{"type": "state", "state": "queued"}]
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self.cancel_requested = threading.Event()
        self.done = threading.Event()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Call ``listener`` with every later event; returns the events so far (replayed by the caller)."""
        with self._lock:
            self._listeners.append(listener)
            return list(self.events)

    def unsubscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self.terminal and event.get("type") != "state":
                return
            self.events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def start(self) -> None:
        self.started = time.monotonic()
        self.state = "running"
        self.emit({"type": "state", "state": "running"})

    def finish(
        self,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        status: int = 200,
        message: str = "",
    ) -> None:
        with self._lock:
            if self.terminal:
                return
            self.state, self.result, self.status, self.message = state, result, status, message
            self.finished = time.monotonic()
            self.payload = {}  # the pixels are not needed any more
            event: dict[str, Any] = (
                {"type": "result"}
                if state == "done"
                else {"type": "error", "status": status, "error": message}
            )
            self.events.append(event)
            listeners = list(self._listeners)
        self.done.set()
        for listener in listeners:
            listener(event)


class _Slot:
    """One worker process, the pipe to it and the thread that feeds it jobs."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Any = None
        self.ready = threading.Event()
        self.job: Job | None = None
        self.spawn()
        self.thread = threading.Thread(
            target=self.loop, name=f"perspicio-serve-{index}", daemon=True
        )
        self.thread.start()

    def spawn(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        from .work import worker_main

        self.ready.clear()
        self.process = ctx.Process(
            target=worker_main,
            args=(
                child,
                self.pool.models,
                self.pool.threads,
                self.pool.preload,
                self.pool.warm_tree,
            ),
            name=f"perspicio-worker-{self.index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.pool.spawned += 1

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=10)
        finally:
            self.conn.close()

    def respawn(self) -> None:
        self.kill()
        if not self.pool.closed:
            self.spawn()

    def boot(self) -> None:
        """Wait for the worker's "ready" (it imports torch and loads the preloaded models); a worker
        that dies or does not start within the pool's ``startup_limit`` is replaced."""
        while not self.ready.is_set() and not self.pool.closed:
            limit = time.monotonic() + self.pool.startup_limit
            while not self.pool.closed:
                try:
                    if self.conn.poll(0.05):
                        if self.conn.recv()[0] == "ready":
                            self.ready.set()
                            break
                        continue
                except (EOFError, OSError):
                    pass
                else:
                    if self.process.is_alive() and time.monotonic() < limit:
                        continue
                print(
                    f"perspicio serve: worker {self.index} failed to start; starting a new one.",
                    file=sys.stderr,
                )
                time.sleep(1.0)
                self.respawn()
                break

    def loop(self) -> None:
        while True:
            self.boot()
            job = self.pool.queue.get()
            if job is None:
                return
            if job.cancel_requested.is_set():
                job.finish(
                    "cancelled", status=409, message="the job was cancelled before it started."
                )
                continue
            self.job = job
            try:
                self.run(job)
            except Exception as exc:  # noqa: BLE001 - the pool must outlive any one job
                print(
                    f"perspicio serve: worker {self.index}: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
                job.finish(
                    "error",
                    status=500,
                    message="internal error (the worker failed); see the server log.",
                )
                self.respawn()
            finally:
                self.job = None

    def run(self, job: Job) -> None:
        self.conn.send(("job", job.id, job.kind, job.payload))
        deadline: float | None = None
        while True:
            if self.conn.poll(0.02):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    job.finish(
                        "error",
                        status=500,
                        message="the worker stopped unexpectedly; see the server log.",
                    )
                    self.respawn()
                    return
                kind = msg[0]
                if kind == "started":
                    job.start()
                    deadline = time.monotonic() + job.time_limit
                elif kind == "progress":
                    job.emit({"type": "progress", **msg[2]})
                elif kind == "done":
                    job.finish("done", result=msg[2])
                    return
                elif kind == "error":
                    job.finish("error", status=int(msg[2]), message=str(msg[3]))
                    return
                continue
            if job.cancel_requested.is_set():
                self.respawn()
                job.finish("cancelled", status=409, message="the job was cancelled.")
                return
            if deadline is not None and time.monotonic() > deadline:
                self.respawn()
                job.finish(
                    "error",
                    status=504,
                    message=f"the job ran over its time limit of {job.time_limit:g} s and was stopped.",
                )
                self.pool.timeouts += 1
                return
            if not self.process.is_alive():
                job.finish(
                    "error",
                    status=500,
                    message="the worker stopped unexpectedly; see the server log.",
                )
                self.respawn()
                return


class WorkerPool:
    """``workers`` processes fed from one queue of at most ``queue_limit`` waiting jobs.

    Args:
        models: model id -> spec (what :func:`perspicio.zoo.resolve_model` accepts); a job names an id.
        workers: number of processes (default: one per core).
        queue_limit: jobs that may wait; one more raises :class:`Busy`.
        time_limit: default seconds a job may run once started.
        preload: model ids every worker loads at start.
        warm_tree: compile the TreeSHAP kernels in each worker at start, in the background.
    """

    def __init__(
        self,
        models: dict[str, str],
        *,
        workers: int | None = None,
        queue_limit: int = 32,
        time_limit: float = 120.0,
        preload: Sequence[str] = (),
        startup_limit: float = 300.0,
        warm_tree: bool = False,
    ) -> None:
        cores = os.cpu_count() or 1
        self.workers = max(1, int(workers or cores))
        self.threads = max(1, cores // self.workers)
        self.models = dict(models)
        self.preload = list(preload)
        self.warm_tree = bool(warm_tree)
        self.queue_limit = max(0, int(queue_limit))
        self.time_limit = float(time_limit)
        self.startup_limit = float(startup_limit)
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.queue_limit + self.workers)
        self.spawned = 0
        self.timeouts = 0
        self.closed = False
        self._submit_lock = threading.Lock()
        self.slots = [_Slot(self, i) for i in range(self.workers)]

    def pending(self) -> int:
        """Jobs waiting for a worker."""
        return self.queue.qsize()

    def busy(self) -> int:
        """Jobs running now."""
        return sum(1 for s in self.slots if s.job is not None)

    def submit(self, kind: str, payload: dict[str, Any], *, time_limit: float | None = None) -> Job:
        """Queue a job; :class:`Busy` when ``queue_limit`` jobs are already waiting."""
        job = Job(kind, payload, self.time_limit if time_limit is None else float(time_limit))
        with self._submit_lock:
            waiting = self.queue.qsize() + self.busy()
            if waiting >= self.queue_limit + self.workers:
                raise Busy(self.retry_after())
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise Busy(self.retry_after()) from None
        return job

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: a rough share of the queue ahead of it."""
        return max(1, min(60, int(self.queue.qsize() / self.workers) + 1))

    def cancel(self, job: Job) -> None:
        """Stop ``job``: dropped from the queue, or its worker replaced if it is running."""
        job.cancel_requested.set()

    def wait_ready(self, timeout: float = 300.0) -> bool:
        """Block until every worker has started (tests and benchmarks; the app does not need it)."""
        end = time.monotonic() + timeout
        return all(slot.ready.wait(max(0.0, end - time.monotonic())) for slot in self.slots)

    def pids(self) -> list[int]:
        """Process ids of the workers (memory measurements)."""
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    def close(self) -> None:
        """Stop every worker (queued jobs are cancelled)."""
        self.closed = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.finish("cancelled", status=503, message="the server is shutting down.")
        for slot in self.slots:
            if slot.job is not None:
                slot.job.cancel_requested.set()
        for _ in self.slots:
            self.queue.put(None)
        for slot in self.slots:
            slot.thread.join(timeout=5)
            slot.kill()
