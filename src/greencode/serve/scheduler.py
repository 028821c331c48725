"""The one scheduler between the HTTP side and the model: admission control, deadlines,
cancellation, and each request's stream of token events.

* **Admission by deadline** (:meth:`Scheduler.submit`): a request waits while it can still finish within
  its deadline. From the drain rate the worker measures (seconds per decoding step, seconds per
  prefilled prompt token) and the work ahead of it (each decoding row's remaining tokens, each
  waiting request's prompt and tokens, first come first served over ``serve.max_batch_size`` rows),
  :class:`DrainModel` gives its expected finish (times ``serve.admission_margin``: the model leaves out
  what a join costs the rows already decoding and the longer contexts of a full batch); a request that
  cannot finish in time is refused at once with a JSON 503 whose ``Retry-After`` is how long the
  backlog needs to drain enough
  (``rejected{reason="deadline"}``). The waiting room is bounded in memory: at most
  ``serve.max_queued_tokens`` prompt tokens wait (and ``serve.queue_size`` requests, a safety count);
  past that a 503 ``rejected{reason="busy"}``. Before the first step has been measured every request
  within those bounds is admitted. An admitted request is run (or answered 504 if its deadline passes
  first after all).
* **Preparation** (encoding the prompt, choosing the controller) runs on a helper thread, so a
  request that cannot run fails with its 4xx before its response starts, and a long prompt does
  not block the event loop.
* **The worker** (:meth:`Scheduler._worker_loop`): one thread runs the model over one
  :class:`~greencode.decoding.generate.DecodeBatch` (continuous batching). Before every decoding
  step it takes the requests queued meanwhile, up to ``serve.max_batch_size`` rows, and lets them
  join (prefill, then they step with the others); rows leave as they finish. While rows are decoding,
  at most ``serve.max_prefill_tokens`` prompt tokens are prefilled between two steps: prompts that fit
  join together, and a longer one is prefilled a chunk per step and joins after its last chunk
  (chunked prefill), so a long prompt does not stall the streams already running. Each row keeps its own
  controller (threshold or target), mode (a lossless row drafts and is verified within the same steps),
  sampling, stop strings and deadline. Each token's
  :class:`~greencode.serve.requests.TokenEvent` is handed to the request's asyncio queue with
  ``loop.call_soon_threadsafe`` as the step produces it.
* **Deadlines**: every request has ``serve.request_timeout_s`` from submission. The decoding loop
  stops between tokens once it passes, and the stream raises a 504 :class:`RequestError`
  (``rejected{reason="timeout"}``): a non-streamed request is answered 504, a streamed one ends
  with its protocol's error event.
* **Cancellation**: :meth:`RequestStream.cancel` (the client went away) stops the decoding loop
  between tokens, or drops the job if it has not started.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from greencode.config import ConfigError
from greencode.serve.engine import Engine, Job
from greencode.serve.requests import Completion, GenRequest
from greencode.serve.errors import RequestError
from greencode.serve.requests import Event, FinalEvent

log = logging.getLogger(__name__)


def _timeout_error(timeout_s: float) -> RequestError:
    return RequestError(504, f"generation did not finish within serve.request_timeout_s={timeout_s:g} s; ask for "
                             "fewer tokens or retry when the server is less busy", kind="timeout")


class DrainModel:
    """The worker's measured drain rate, and a request's expected finish from it.

    Seconds per decoding step are kept per number of rows decoded (an exponential moving average
    each); a step at a number of rows not measured yet is extrapolated linearly from the nearest
    smaller one measured (an upper bound: a batch costs less than its rows one by one), or taken
    from the nearest larger one. Prefill is kept as seconds per prompt token. The expected finish of
    a new request simulates first come, first served over ``slots`` rows, in steps at the step time of
    the occupancy it will run at: every decoding row frees its slot after its remaining tokens, each
    waiting request then takes the first free slot for its tokens (upper bounds: an EOS ends a row
    sooner); every prefill up to the new request's own is added, since a prefill holds up every row."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.step_s_by_rows: dict[int, float] = {}
        self.prefill_s_per_token: Optional[float] = None

    def _ewma(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_step(self, seconds: float, rows: int = 1) -> None:
        rows = max(1, int(rows))
        self.step_s_by_rows[rows] = self._ewma(self.step_s_by_rows.get(rows), float(seconds))

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.prefill_s_per_token = self._ewma(self.prefill_s_per_token, float(seconds) / tokens)

    def step_s(self, rows: int) -> Optional[float]:
        """Expected seconds per step with ``rows`` rows (None before any step was measured)."""
        known = self.step_s_by_rows
        if not known:
            return None
        if rows in known:
            return known[rows]
        below = [r for r in known if r < rows]
        if below:
            r0 = max(below)
            return known[r0] * rows / r0
        return known[min(known)]

    def expected_finish(self, running: list, waiting: list, slots: int, new: tuple) -> Optional[float]:
        """Seconds from now until ``new`` = (prompt tokens, max new tokens) would finish after the
        ``running`` rows' remaining tokens and the ``waiting`` (prompt, max new tokens) ahead of it;
        None before anything was measured."""
        step = self.step_s(max(1, min(slots, len(running) + len(waiting) + 1)))
        if step is None:
            return None
        free = list(running[:slots]) + [0] * max(0, slots - len(running))  # in steps
        heapq.heapify(free)
        done = 0
        for _, max_new in list(waiting) + [new]:
            done = heapq.heappop(free) + max_new
            heapq.heappush(free, done)
        # one worker: every prefill up to this request's (its own included) holds up every row
        prefill = (self.prefill_s_per_token or 0.0) * (sum(p for p, _ in waiting) + new[0])
        return done * step + prefill


class RequestStream:
    """The events of one admitted request: ``async for event in stream``.

    Yields :class:`TokenEvent`s (streamed requests) and then one :class:`FinalEvent`; an error
    is raised in place of the next event. Past the request's deadline the stream raises a 504
    :class:`RequestError` and the decoding loop is told to stop."""

    def __init__(self, scheduler: "Scheduler", gen: GenRequest, deadline: float,
                 loop: asyncio.AbstractEventLoop):
        self.scheduler = scheduler
        self.gen = gen
        self.deadline = deadline  # time.perf_counter() seconds
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False
        self._timed_out = False

    # ---------------------------------------------------------------- worker side (any thread)
    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def push(self, event: Event) -> None:
        self._put(event)

    def fail(self, exc: BaseException) -> None:
        self._put(exc)

    def should_stop(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # ---------------------------------------------------------------- consumer side (the event loop)
    def cancel(self) -> None:
        """Stop the request: the decoding loop ends between tokens (or never starts)."""
        self._cancelled.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            if not self._queue.empty():  # what already arrived is delivered, deadline or not
                item = self._queue.get_nowait()
            else:
                remaining = self.deadline - time.perf_counter()
                item = await asyncio.wait_for(self._queue.get(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            self._done = True
            self.cancel()
            if not self._timed_out:
                self._timed_out = True
                self.scheduler._count_rejected("timeout")
            raise _timeout_error(self.scheduler.timeout_s) from None
        if isinstance(item, BaseException):
            self._done = True
            if isinstance(item, RequestError) and item.status == 504 and not self._timed_out:
                self._timed_out = True
                self.scheduler._count_rejected("timeout")
            raise item
        if isinstance(item, FinalEvent):
            self._done = True
        return item

    async def result(self) -> Completion:
        """Drain the stream to its :class:`FinalEvent` and return the completion."""
        async for event in self:
            if isinstance(event, FinalEvent):
                return event.completion
        raise RuntimeError("the request's stream ended without a final event")


class Scheduler:
    """One worker thread decodes up to ``max_batch_size`` requests together; at most
    ``queue_size`` more wait."""

    def __init__(self, engine: Engine, queue_size: int, timeout_s: float,
                 on_rejected: Optional[Callable[[str], None]] = None, max_batch_size: int = 1,
                 max_prefill_tokens: int = 4096, max_queued_tokens: Optional[int] = None,
                 on_queue_wait: Optional[Callable[[float], None]] = None, admission_margin: float = 1.0):
        self.engine = engine
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_prefill_tokens = max(1, int(max_prefill_tokens))
        self.capacity = int(queue_size) + self.max_batch_size
        self.max_queued_tokens = None if max_queued_tokens is None else int(max_queued_tokens)
        self.timeout_s = float(timeout_s)
        self.on_rejected = on_rejected
        self.on_queue_wait = on_queue_wait
        self.drain = DrainModel()
        self.admission_margin = float(admission_margin)  # the expected finish is taken this many times over
        self._waiting: dict[int, tuple[int, int]] = {}  # id(job) -> (prompt tokens, max new tokens), not joined yet
        self._running: list[int] = []  # the decoding rows' remaining tokens (published by the worker)
        self._lock = threading.Lock()
        self._in_flight = 0
        # (job, stream) pairs for the worker, a callable to run there (warm-up), None to stop it
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greencode-prepare")
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Admitted requests not finished yet (running, queued or being prepared)."""
        return self._in_flight

    def _count_rejected(self, reason: str) -> None:
        if self.on_rejected is not None:
            self.on_rejected(reason)

    # ---------------------------------------------------------------- admission
    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.capacity:
                busy = self._in_flight
            else:
                self._in_flight += 1
                return
        self._count_rejected("busy")
        raise RequestError(503, f"server busy: {busy} requests running or queued (serve.max_batch_size="
                                f"{self.max_batch_size}, serve.queue_size={self.capacity - self.max_batch_size}); "
                                "retry shortly", kind="server_busy",
                           headers={"Retry-After": "1"})

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _admit_by_deadline(self, job: Job, submitted: float) -> None:
        """Queue ``job`` only if it can finish within its deadline and the waiting room has room for
        its prompt (else a 503 with ``Retry-After``); registers it as waiting."""
        work = (len(job.ids), int(job.gen.max_new_tokens))
        with self._lock:
            waiting, running = list(self._waiting.values()), list(self._running)
            queued = sum(p for p, _ in waiting)
            if self.max_queued_tokens is not None and waiting and queued + work[0] > self.max_queued_tokens:
                reason = "busy"
            else:
                eta = self.drain.expected_finish(running, waiting, self.max_batch_size, work)
                eta = None if eta is None else eta * self.admission_margin
                late = None if eta is None else time.perf_counter() - submitted + eta - self.timeout_s
                if late is None or late <= 0:
                    self._waiting[id(job)] = work
                    return
                reason = "deadline"
        self._count_rejected(reason)
        if reason == "busy":
            raise RequestError(503, f"server busy: {queued} prompt tokens are waiting (serve.max_queued_tokens="
                                    f"{self.max_queued_tokens}); retry shortly", kind="server_busy",
                               headers={"Retry-After": "1"})
        raise RequestError(503, f"server busy: this request would finish in about {eta:.1f} s, past its deadline "
                                f"(serve.request_timeout_s={self.timeout_s:g}); {len(waiting)} requests wait and "
                                f"{len(running)} are decoding. Retry in {math.ceil(late)} s or ask for fewer tokens",
                           kind="server_busy", headers={"Retry-After": str(max(1, math.ceil(late)))})

    def _left_queue(self, job: Job) -> None:
        with self._lock:
            self._waiting.pop(id(job), None)

    def _publish(self, live: dict) -> None:
        """The decoding rows' remaining tokens, for admission (worker side)."""
        running = [max(0, job.gen.max_new_tokens - len(row.tokens)) for row, job, _ in live.values()]
        with self._lock:
            self._running = running

    async def submit(self, gen: GenRequest) -> RequestStream:
        """Admit ``gen`` (or raise a 503 :class:`RequestError` at once), prepare it (its 4xx
        raised here) and queue it for the worker; returns its :class:`RequestStream`."""
        self._admit()
        submitted = time.perf_counter()
        deadline = submitted + self.timeout_s
        try:
            if self._closed:
                self._count_rejected("shutdown")
                raise RequestError(503, "server is shutting down; retry against a running server",
                                   kind="server_busy", headers={"Retry-After": "5"})
            loop = asyncio.get_running_loop()
            job = await loop.run_in_executor(self._prepare, self.engine.prepare, gen, submitted, deadline)
            self._admit_by_deadline(job, submitted)
            stream = RequestStream(self, gen, deadline, loop)
            self._enqueue((job, stream))
        except BaseException:
            self._release()
            raise
        return stream

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn(*args)`` on the model's worker thread (warm-up), outside admission control."""
        future: Future = Future()

        def task() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

        self._enqueue(task)
        return await asyncio.wrap_future(future)

    # ---------------------------------------------------------------- the worker
    def start(self) -> None:
        """Open for requests (again, after :meth:`shutdown`) and start the worker thread."""
        with self._lock:
            self._closed = False
        self._enqueue(None)

    def _enqueue(self, task: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker_loop, args=(self._jobs,), name="greencode-model",
                                                daemon=True)
                self._thread.start()
            if task is not None:
                self._jobs.put(task)

    def _worker_loop(self, jobs: queue.Queue) -> None:
        """Continuous batching: before every step, the requests queued meanwhile join the batch
        (up to ``max_batch_size`` rows); one step decodes one token for every row; finished rows
        end their streams. Blocks only while nothing is being decoded."""
        batch = None
        live: dict[int, tuple[Any, Job, RequestStream]] = {}  # id(row) -> (row, job, stream)
        pending: list[tuple[Job, RequestStream]] = []  # taken from the queue, not joined yet (prefill budget)
        partial: dict[int, Any] = {}  # id(job) -> its chunked prefill so far (a long prompt joining over steps)
        stopping = False
        while True:
            while not stopping and len(live) + len(pending) < self.max_batch_size:
                try:
                    item = jobs.get(block=not live and not pending)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                elif callable(item):
                    item()
                else:
                    pending.append(item)
            if pending and not live:  # nobody is decoding: whole prompts join at once (at least one)
                budget, n = self.max_prefill_tokens, 0
                while n < len(pending) and (n == 0 or budget >= len(pending[n][0].ids)):
                    budget -= len(pending[n][0].ids)
                    n += 1
                new, pending = pending[:n], pending[n:]
                batch = self._join(batch, new, live)
            elif pending:
                batch = self._prefill_budgeted(batch, pending, partial, live)
            if live:
                try:
                    t0, rows = time.perf_counter(), len(live)
                    finished = self.engine.step(batch)
                    self.drain.observe_step(time.perf_counter() - t0, rows)
                except Exception as e:  # noqa: BLE001 - the whole batch fails: every row learns why
                    log.exception("decoding step failed for %d requests", len(live))
                    for row, job, stream in live.values():
                        self.engine.abandon(row)
                        self._end(stream, e)
                    live.clear()
                    self._publish(live)
                    batch = None
                    continue
                self._finished(batch, finished, live)
                self._publish(live)
            elif stopping:
                return

    def _prefill_budgeted(self, batch, pending: list, partial: dict, live: dict):
        """Chunked prefill while rows are decoding: at most ``max_prefill_tokens`` prompt tokens are
        prefilled before the next step. Whole prompts that fit join together; a longer one is
        prefilled a chunk per step (its cache kept in ``partial``) and joins when its last chunk is
        done, so the running streams keep producing tokens meanwhile (vLLM's and TGI's chunked
        prefill). ``pending`` is consumed in arrival order, in place."""
        budget = self.max_prefill_tokens
        while pending and budget > 0:
            job, stream = pending[0]
            state = partial.get(id(job))
            if stream.cancelled or (job.deadline is not None and time.perf_counter() > job.deadline):
                pending.pop(0)
                partial.pop(id(job), None)
                batch = self._join(batch, [(job, stream)], live)  # ends it (cancelled / timed out)
                continue
            if state is None and len(job.ids) <= self.max_prefill_tokens:
                if len(job.ids) > budget:  # a short prompt waits for the next step's budget, whole
                    break
                # whole prompts that fit: together, as one prefill
                n, used = 0, 0
                while n < len(pending) and id(pending[n][0]) not in partial and used + len(pending[n][0].ids) <= budget:
                    used += len(pending[n][0].ids)
                    n += 1
                new = pending[:n]
                del pending[:n]
                budget -= used
                batch = self._join(batch, new, live)
                continue
            done = 0 if state is None else int(state.input_ids.shape[1])
            upto = min(len(job.ids), done + budget)
            t0 = time.perf_counter()
            try:
                state = self.engine.prefill_chunk(job, upto, state)
            except Exception as e:  # noqa: BLE001 - a prefill that fails fails its own request only
                log.exception("chunked prefill failed for request %s", job.gen.request_id)
                pending.pop(0)
                partial.pop(id(job), None)
                self._left_queue(job)
                self._end(stream, RequestError(422, f"cannot generate: {e}") if isinstance(e, (ValueError, ConfigError))
                          else e)
                continue
            self.drain.observe_prefill(time.perf_counter() - t0, upto - done)
            budget -= upto - done
            if upto < len(job.ids):
                partial[id(job)] = state
                break
            pending.pop(0)
            partial.pop(id(job), None)
            batch = self._join(batch, [(job, stream)], live, prefilled=state)
        return batch

    def _join(self, batch, new: list, live: dict, prefilled=None):
        """Let the queued requests ``new`` join ``batch`` (a new one when empty); returns it.
        ``prefilled``: the one request's prompt, already prefilled (chunked)."""
        rows = []
        for job, stream in new:
            self._left_queue(job)
            if stream.cancelled:
                self._end(stream, None)
            elif self._closed:
                self._end(stream, RequestError(503, "server is shutting down; retry against a running server",
                                               kind="server_busy", headers={"Retry-After": "5"}))
            elif job.deadline is not None and time.perf_counter() > job.deadline:  # timed out while queued
                self._end(stream, _timeout_error(self.timeout_s))
            else:
                row = self.engine.row(job, stream.push if job.gen.stream else None, stream.should_stop)
                rows.append((row, job, stream))
        if not rows:
            return batch
        if batch is None or not len(batch):
            batch = self.engine.new_batch()
        now = time.perf_counter()
        if self.on_queue_wait is not None:
            for _, job, _ in rows:
                self.on_queue_wait(max(0.0, now - job.submitted_at - job.tokenize_s))
        try:
            if prefilled is not None:
                finished = batch.add([r for r, _, _ in rows], prefilled.input_ids, prefilled=prefilled)
            else:
                finished = batch.add([r for r, _, _ in rows], [j.ids for _, j, _ in rows])
                self.drain.observe_prefill(time.perf_counter() - now, sum(len(j.ids) for _, j, _ in rows))
        except Exception as e:  # noqa: BLE001 - a prefill that fails fails its own requests only
            log.exception("prefill failed for %d requests", len(rows))
            err = RequestError(422, f"cannot generate: {e}") if isinstance(e, (ValueError, ConfigError)) else e
            for row, _, stream in rows:
                self.engine.abandon(row)
                self._end(stream, err)
            return batch
        for entry in rows:
            live[id(entry[0])] = entry
        self._finished(batch, finished, live)
        self._publish(live)
        return batch

    def _finished(self, batch, rows: list, live: dict) -> None:
        """End the streams of the rows that finished: their final event, or the error."""
        for row in rows:
            _, job, stream = live.pop(id(row))
            try:
                result = self.engine.result(batch, row)
            except Exception as e:  # noqa: BLE001 - reported to the request, logged with its traceback
                log.exception("finishing request %s failed", job.gen.request_id)
                self._end(stream, e)
                continue
            self._end(stream, self._last_item(job, stream, result))

    def _last_item(self, job: Job, stream: RequestStream, result) -> Any:
        """What ends a finished request's stream: its final event, or the error (None for a
        cancelled stream, which has no listener)."""
        try:
            if result.finish_reason == "cancelled":  # the deadline stopped it, or the client went away
                return None if stream.cancelled else _timeout_error(self.timeout_s)
            completion = self.engine.finish(job, result)
            return FinalEvent(completion, tail=job.flush(completion.text))
        except RequestError as e:
            return e
        except Exception as e:  # noqa: BLE001 - reported to the request, logged with its traceback
            log.exception("finishing request %s failed", job.gen.request_id)
            return e

    def _end(self, stream: RequestStream, last: Any) -> None:
        """Release the request's admission slot, then hand over its last item (the final event or
        an error; none for a cancelled stream), so a client that got its answer never sees its
        request still counted."""
        self._release()
        if last is not None:
            stream.push(last) if isinstance(last, FinalEvent) else stream.fail(last)

    def shutdown(self) -> None:
        """Close for new requests and let the worker end after the jobs already queued (those
        not started are answered 503)."""
        with self._lock:
            self._closed = True
            jobs, self._jobs, self._thread = self._jobs, queue.Queue(), None
        jobs.put(None)


__all__ = ["DrainModel", "RequestStream", "Scheduler"]
