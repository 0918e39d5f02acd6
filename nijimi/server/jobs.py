"""The job queue: one worker thread runs one job at a time, the others wait in the order they came (FIFO).

A :class:`Job` is a function of the job run in the worker thread (generations and model switches alike, so a switch
never lands in the middle of a generation). Its step callback (:meth:`Job.step`) records progress — the step, the
batch, the latest x̂₀ for a preview — and raises :class:`~nijimi.server.errors.Cancelled` once the job is
interrupted, which unwinds the pipeline before anything is written. An exception in a job fails that job only.
Every change is published to an :class:`EventHub`, whose subscribers (server-sent event streams) each get a bounded
queue: a slow reader loses events instead of slowing the worker.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nijimi.diffusion.samplers import StepInfo
from nijimi.errors import NijimiError
from nijimi.pipelines.images import to_pil
from nijimi.server.errors import ApiError, Cancelled

log = logging.getLogger("nijimi.server")
Render = Callable[[torch.Tensor], torch.Tensor]
"""Latents (B, C, h, w) → preview pixels (B, 3, H, W) in [0, 1] (a pipeline's ``latent_rgb``)."""


class EventHub:
    """Fan-out of event dicts to subscribers, each a queue of at most ``size`` events (later ones are dropped while
    it is full). :meth:`close` ends every subscription with a ``None``."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.subscribers: set[queue.Queue] = set()
        self.closed = False

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(self.size)
        with self.lock:
            if self.closed:
                q.put(None)
            self.subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self.lock:
            self.subscribers.discard(q)

    def publish(self, event: dict) -> None:
        with self.lock:
            for q in self.subscribers:
                try:
                    q.put_nowait(event)
                except queue.Full:
                    pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for q in self.subscribers:
                while True:
                    try:
                        q.put_nowait(None)
                        break
                    except queue.Full:
                        q.get_nowait()


@dataclass
class Progress:
    """Where a job is, in A1111's terms: batch ``job_no`` of ``job_count``, sampling step ``step`` of ``steps``."""

    job_count: int = 1
    job_no: int = 0
    step: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    latents: torch.Tensor | None = None
    render: Render | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    shown: tuple[tuple[int, int], bytes | None] = ((-1, -1), None)

    @property
    def fraction(self) -> float:
        """Done share of the job in [0, 1]."""
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.job_no + within) / max(self.job_count, 1))

    @property
    def eta(self) -> float:
        """A1111's ``eta_relative``: seconds left at the speed so far (0 before the first step)."""
        done, elapsed = self.fraction, time.monotonic() - self.started
        return elapsed / done - elapsed if done > 0 else 0.0

    def preview_png(self) -> bytes | None:
        """The latest x̂₀ as a PNG (a row of the batch's images), made once per step on demand; None before the
        first step or without a renderer."""
        with self.lock:
            latents, render, tick = self.latents, self.render, (self.job_no, self.step)
            if self.shown[0] == tick or latents is None or render is None:
                return self.shown[1] if self.shown[0] == tick else None
        pixels = render(latents)
        buffer = io.BytesIO()
        to_pil(torch.cat(list(pixels), dim=2)[None])[0].save(buffer, format="PNG")
        with self.lock:
            self.shown = (tick, buffer.getvalue())
        return self.shown[1]

    def to_dict(self) -> dict[str, Any]:
        return {"job_no": self.job_no, "job_count": self.job_count, "sampling_step": self.step,
                "sampling_steps": self.steps, "progress": self.fraction, "eta_relative": self.eta}


@dataclass(eq=False)
class Job:
    """One unit of work: ``work(job)`` runs in the worker thread; ``kind`` names it in events; ``id`` may be chosen
    by the client (A1111's ``force_task_id``). :meth:`wait` returns ``work``'s result or raises its error."""

    work: Callable[[Job], Any]
    kind: str = "generate"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    progress: Progress = field(default_factory=Progress)
    result: Any = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    hub: EventHub | None = None

    def begin(self, job_count: int, render: Render | None) -> None:
        """Start counting progress over ``job_count`` batches, previews drawn by ``render``."""
        self.progress = Progress(job_count=job_count, render=render)

    def step(self, job_no: int, info: StepInfo) -> None:
        """The step callback of batch ``job_no``: record progress, publish it, or raise Cancelled."""
        if self.cancelled.is_set():
            raise Cancelled(f"job {self.id} was interrupted")
        p = self.progress
        with p.lock:
            p.job_no, p.step, p.steps = job_no, info.i + 1, info.steps
            p.latents = info.denoised.detach().float().cpu().clone()
        self.publish("progress", **p.to_dict())

    def publish(self, kind: str, **fields: Any) -> None:
        if self.hub is not None:
            self.hub.publish({"type": kind, "job": self.id, "kind": self.kind, **fields})

    def wait(self) -> Any:
        """Block until the job has ended; its result, or its error raised here."""
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.result


class JobQueue:
    """FIFO jobs run one at a time by a worker thread (:meth:`start`); at most ``limit`` wait (503 beyond)."""

    def __init__(self, hub: EventHub, limit: int = 64) -> None:
        self.hub = hub
        self.limit = limit
        self.waiting: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nijimi-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; ApiError 503 when ``limit`` jobs already wait or the server is stopping."""
        with self.condition:
            if self.stopping or len(self.waiting) >= self.limit:
                raise ApiError(503, "Busy", f"the queue is full ({self.limit} jobs wait) or the server is stopping")
            job.hub = self.hub
            self.waiting.append(job)
            job.publish("queued", position=len(self.waiting))
            self.condition.notify()
        return job

    def interrupt(self) -> Job | None:
        """Cancel the running job (A1111's interrupt); returns it, None when nothing runs."""
        with self.condition:
            job = self.current
        if job is not None:
            job.cancelled.set()
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the running one and those waiting, and wait for the worker to end."""
        with self.condition:
            self.stopping = True
            dropped, self.waiting = list(self.waiting), collections.deque()
            self.condition.notify()
        for job in dropped:
            self._finish(job, "cancelled", error=ApiError(503, "Stopping", "the server is stopping"))
        self.interrupt()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.stopping:
                    self.condition.wait()
                if self.stopping:
                    return
                job = self.current = self.waiting.popleft()
            self._run(job)

    def _run(self, job: Job) -> None:
        job.state = "running"
        job.publish("started")
        try:
            result = job.work(job)
        except Cancelled as exc:
            self._finish(job, "interrupted", error=exc)
        except NijimiError as exc:
            self._finish(job, "failed", error=exc)
        except Exception as exc:  # a bug or an unexpected failure: this job fails, the server goes on
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", error=ApiError(500, "InternalError",
                                                       f"the job failed: {type(exc).__name__}: {exc}"))
        else:
            self._finish(job, "done", result=result)

    def _finish(self, job: Job, state: str, result: Any = None, error: BaseException | None = None) -> None:
        """Record the end of ``job`` (no longer the current one once its waiter wakes) and wake its waiter."""
        with self.condition:
            if self.current is job:
                self.current = None
        job.state, job.result, job.error = state, result, error
        job.publish(state, **({"detail": str(error)} if error is not None else {}))
        job.finished.set()
