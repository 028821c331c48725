"""The scheduler alone, over a stub engine (no model): token events arrive while the run is still
going, admission refuses at once when full and serves every admitted request, deadlines end
a stream with 504, cancellation stops the run between tokens or skips a queued job."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from greencode.serve.requests import Completion
from greencode.serve.errors import RequestError
from greencode.serve.requests import FinalEvent, TokenEvent
from greencode.serve.scheduler import Scheduler


class StubBatch:
    """A DecodeBatch stand-in: each step sleeps ``step_s`` and gives every row one token event,
    polling its ``should_stop`` first; records how many rows each step decoded."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []

    def __len__(self):
        return len(self.rows)

    def add(self, rows, prompts):
        assert len(rows) == len(prompts)
        for row in rows:
            row.record["joined_at_step"] = len(self.engine.step_sizes)
        self.rows += rows
        return []

    def step(self):
        self.engine.step_sizes.append(len(self.rows))
        time.sleep(self.engine.step_s)
        finished = []
        for row in self.rows:
            rec = row.record
            if row.should_stop():
                rec["finish"] = "cancelled"
                finished.append(row)
                continue
            rec["tokens"] += 1
            row.tokens.append(99 + rec["tokens"])
            rec["emitted_at"].append(time.perf_counter())
            if row.on_event is not None:
                row.on_event(TokenEvent(rec["tokens"] - 1, 99 + rec["tokens"], "x", 0))
            if rec["tokens"] >= self.engine.tokens:
                rec["finish"] = "length"
                finished.append(row)
        self.rows = [r for r in self.rows if r not in finished]
        return finished


class StubEngine:
    """prepare / row / step / result / finish like :class:`~greencode.serve.engine.Engine`, over
    :class:`StubBatch`: ``tokens`` token events per request, ``step_s`` apart."""

    def __init__(self, tokens=8, step_s=0.02, bad_prompt="bad"):
        self.tokens, self.step_s, self.bad_prompt = tokens, step_s, bad_prompt
        self.runs: list[dict] = []
        self.step_sizes: list[int] = []
        self.lock = threading.Lock()

    def prepare(self, gen, submitted_at=None, deadline=None):
        if gen.prompt == self.bad_prompt:
            raise RequestError(422, "bad prompt", loc="body.prompt")
        return SimpleNamespace(gen=gen, deadline=deadline, ids=[1, 2], flush=lambda text: "!",
                               submitted_at=submitted_at or time.perf_counter(), tokenize_s=0.0)

    def new_batch(self):
        return StubBatch(self)

    def row(self, job, on_event=None, should_stop=None):
        record = {"prompt": job.gen.prompt, "tokens": 0, "emitted_at": []}
        with self.lock:
            self.runs.append(record)

        def stop():
            return (should_stop is not None and should_stop()) or bool(job.deadline and
                                                                       time.perf_counter() > job.deadline)

        return SimpleNamespace(record=record, on_event=on_event, should_stop=stop, handle=job, tokens=[])

    def step(self, batch):
        return batch.step()

    def result(self, batch, row):
        return SimpleNamespace(finish_reason=row.record["finish"])

    def abandon(self, row):
        pass

    def finish(self, job, res):
        return Completion(text="x" * self.tokens + "!", prompt_ids=[1], tokens=list(range(self.tokens)),
                          finish_reason=res.finish_reason, stats={})


def _gen(prompt="p", stream=True):
    from greencode.serve.requests import GenRequest

    return GenRequest(prompt=prompt, max_new_tokens=8, stream=stream)


def test_token_events_arrive_as_produced_and_join_with_the_tail():
    engine = StubEngine(tokens=8, step_s=0.05)
    sched = Scheduler(engine, queue_size=2, timeout_s=30)

    async def go():
        stream = await sched.submit(_gen())
        got = []
        async for ev in stream:
            got.append((time.perf_counter(), ev))
        return got

    got = asyncio.run(go())
    tokens = [ev for _, ev in got if isinstance(ev, TokenEvent)]
    assert [ev.index for ev in tokens] == list(range(8)) and isinstance(got[-1][1], FinalEvent)
    final = got[-1][1]
    assert "".join(ev.text for ev in tokens) + final.tail == final.completion.text
    # each event reached the loop right after the worker produced it, long before the run ended
    produced = engine.runs[0]["emitted_at"]
    assert got[0][0] - produced[0] < 0.15 and got[0][0] < produced[-1] - 0.2
    assert sched.in_flight == 0


def test_admission_refuses_at_once_and_serves_everything_it_admitted():
    engine = StubEngine(tokens=4, step_s=0.02)
    rejected = []
    sched = Scheduler(engine, queue_size=2, timeout_s=30, on_rejected=rejected.append)

    async def one(i):
        t0 = time.perf_counter()
        try:
            stream = await sched.submit(_gen(f"p{i}", stream=False))
        except RequestError as e:
            return e.status, time.perf_counter() - t0, e.headers
        return (await stream.result()).text, None, None

    async def burst():
        return await asyncio.gather(*[one(i) for i in range(10)])

    results = asyncio.run(burst())
    served = [r for r in results if r[0] == "xxxx!"]
    refused = [r for r in results if r[0] == 503]
    assert len(served) == 3 and len(refused) == 7  # one decoding (max_batch_size=1) + queue_size waiting
    assert all(dt < 0.05 and h["Retry-After"] for _, dt, h in refused)  # refused before any work
    assert rejected == ["busy"] * 7 and sched.in_flight == 0
    assert len(engine.runs) == 3 and all(r["finish"] == "length" for r in engine.runs)


def test_prepare_errors_come_from_submit_and_free_the_slot():
    sched = Scheduler(StubEngine(), queue_size=0, timeout_s=30)

    async def go():
        with pytest.raises(RequestError) as e:
            await sched.submit(_gen("bad"))
        assert e.value.status == 422 and sched.in_flight == 0
        return await (await sched.submit(_gen("good", stream=False))).result()

    assert asyncio.run(go()).text.endswith("!")


def test_deadline_ends_a_stream_with_504_and_stops_the_run():
    engine = StubEngine(tokens=50, step_s=0.02)
    rejected = []
    sched = Scheduler(engine, queue_size=2, timeout_s=0.2, on_rejected=rejected.append)

    async def go():
        stream = await sched.submit(_gen())
        seen = 0
        with pytest.raises(RequestError) as e:
            async for ev in stream:
                seen += isinstance(ev, TokenEvent)
        return seen, e.value

    seen, err = asyncio.run(go())
    assert err.status == 504 and "request_timeout_s" in err.message and 1 <= seen < 50
    deadline = time.monotonic() + 5
    while sched.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.runs[0]["finish"] == "cancelled" and engine.runs[0]["tokens"] < 50
    assert rejected == ["timeout"] and sched.in_flight == 0


def test_cancel_stops_the_run_between_tokens_and_skips_queued_jobs():
    engine = StubEngine(tokens=50, step_s=0.02)
    sched = Scheduler(engine, queue_size=4, timeout_s=30)

    async def go():
        running = await sched.submit(_gen("running"))
        queued = await sched.submit(_gen("queued"))
        queued.cancel()  # gone before it started: never run
        async for ev in running:
            if isinstance(ev, TokenEvent) and ev.index == 2:
                running.cancel()  # the client went away
                break
        t0 = time.perf_counter()
        while sched.in_flight:
            await asyncio.sleep(0.005)
        return time.perf_counter() - t0

    freed_after = asyncio.run(go())
    assert [r["prompt"] for r in engine.runs] == ["running"]
    assert engine.runs[0]["finish"] == "cancelled" and engine.runs[0]["tokens"] <= 5 and freed_after < 0.5


def test_shutdown_refuses_new_work_and_start_reopens():
    sched = Scheduler(StubEngine(tokens=1, step_s=0.0), queue_size=2, timeout_s=30)

    async def go():
        sched.start()
        assert await sched.call(lambda: 41 + 1) == 42
        sched.shutdown()
        with pytest.raises(RequestError) as e:
            await sched.submit(_gen())
        assert e.value.status == 503 and sched.in_flight == 0
        sched.start()
        return await (await sched.submit(_gen(stream=False))).result()

    assert asyncio.run(go()).text == "x!"


def test_concurrent_requests_are_decoded_together_and_late_ones_join_the_next_step():
    """Continuous batching: requests admitted together share each step (up to max_batch_size);
    one that arrives while others are decoding joins the next step instead of waiting for them;
    past max_batch_size requests wait in the queue and join as rows leave."""
    engine = StubEngine(tokens=10, step_s=0.03)
    sched = Scheduler(engine, queue_size=4, timeout_s=30, max_batch_size=3)
    assert sched.capacity == 7

    async def go():
        first = [await sched.submit(_gen(f"p{i}", stream=True)) for i in range(2)]
        async for ev in first[0]:  # two tokens in: a third request arrives mid-generation
            if isinstance(ev, TokenEvent) and ev.index == 1:
                break
        late = await sched.submit(_gen("late", stream=False))
        extra = [await sched.submit(_gen(f"q{i}", stream=False)) for i in range(2)]
        texts = [(await s.result()).text for s in first + [late] + extra]
        return texts

    texts = asyncio.run(go())
    assert texts == ["x" * 10 + "!"] * 5 and sched.in_flight == 0
    runs = {r["prompt"]: r for r in engine.runs}
    assert runs["p0"]["joined_at_step"] == 0 and runs["p1"]["joined_at_step"] <= 1  # p1 may miss the first step
    assert 2 <= runs["late"]["joined_at_step"] < 10  # joined while p0/p1 were still decoding
    assert max(engine.step_sizes) == 3  # never more than max_batch_size rows in a step
    assert min(runs[q]["joined_at_step"] for q in ("q0", "q1")) >= 10  # waited for a row to leave


def test_prefill_budget_lets_a_crowd_join_over_several_steps():
    """At most max_prefill_tokens prompt tokens join per step (the stub's prompts have 2 tokens):
    a crowd arriving together joins one request per step, and all are served."""
    engine = StubEngine(tokens=6, step_s=0.01)
    sched = Scheduler(engine, queue_size=4, timeout_s=30, max_batch_size=4, max_prefill_tokens=3)

    async def go():
        streams = await asyncio.gather(*[sched.submit(_gen(f"c{i}", stream=False)) for i in range(4)])
        return [(await s.result()).text for s in streams]

    assert asyncio.run(go()) == ["x" * 6 + "!"] * 4
    joined = sorted(r["joined_at_step"] for r in engine.runs)
    assert len(set(joined)) == 4  # one per step, never two prompts (4 tokens > 3) in one step


# ---------------------------------------------------------------- admission by deadline

def test_drain_model_simulates_first_come_first_served():
    from greencode.serve.scheduler import DrainModel

    d = DrainModel()
    assert d.expected_finish([5], [], 2, (10, 4)) is None  # nothing measured yet: no estimate
    d.observe_step(0.1, rows=2)
    d.observe_prefill(0.1, 100)  # 1 ms per prompt token
    # at 2 rows, 0.1 s a step: the slots free after 5 and 10 steps; the waiting request takes the first, the
    # new one the second (steps 10..14: 1.4 s), and both prefills (150 tokens: 0.15 s) hold everyone up
    assert abs(d.expected_finish([5, 10], [(100, 8)], 2, (50, 4)) - 1.55) < 1e-9
    # alone it runs at the one-row step time, taken from the nearest larger measurement (an upper bound)
    assert abs(d.expected_finish([], [], 4, (50, 4)) - 0.45) < 1e-9
    # more rows than measured: extrapolated linearly from 2 rows (4 rows: 0.2 s a step)
    assert abs(d.step_s(4) - 0.2) < 1e-9
    assert abs(d.expected_finish([2, 2, 2], [], 4, (0, 3)) - 0.6) < 1e-9
    d.observe_step(0.2, rows=2)  # moving average: 0.8 x 0.1 + 0.2 x 0.2
    assert abs(d.step_s(2) - 0.12) < 1e-9


def test_admission_by_deadline_refuses_only_what_cannot_finish_in_time():
    """Once the drain rate is measured, a burst is admitted as far as each request can still finish
    within its deadline; the rest get a 503 at once, with a Retry-After from the backlog, and every
    admitted request is served in time (none ends with a 504)."""
    engine = StubEngine(tokens=8, step_s=0.05)  # 0.4 s per request, one at a time
    rejected = []
    sched = Scheduler(engine, queue_size=100, timeout_s=1.5, on_rejected=rejected.append)

    async def main():
        await (await sched.submit(_gen("warm", stream=False))).result()  # the drain rate is measured

        async def one(i):
            t0 = time.perf_counter()
            try:
                await (await sched.submit(_gen(f"p{i}", stream=False))).result()
                return 200, time.perf_counter() - t0, None
            except RequestError as e:
                return e.status, time.perf_counter() - t0, e.headers.get("Retry-After")

        return await asyncio.gather(*[one(i) for i in range(10)])

    results = asyncio.run(main())
    sched.shutdown()
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(served) + len(refused) == 10 and 2 <= len(served) <= 4, results
    assert all(t <= 1.5 for _, t, _ in served)  # each within its deadline
    assert all(t < 0.3 and int(ra) >= 1 for _, t, ra in refused)  # refused at once, told when to come back
    assert rejected == ["deadline"] * len(refused) and sched.in_flight == 0


def test_waiting_room_is_bounded_in_prompt_tokens():
    engine = StubEngine(tokens=4, step_s=0.05)
    rejected = []
    sched = Scheduler(engine, queue_size=100, timeout_s=30, on_rejected=rejected.append, max_queued_tokens=5)

    async def main():
        async def one(i):
            try:
                await (await sched.submit(_gen(f"p{i}", stream=False))).result()
                return 200
            except RequestError as e:
                return e.status

        return await asyncio.gather(*[one(i) for i in range(6)])

    codes = asyncio.run(main())
    sched.shutdown()
    # 2 prompt tokens each: at most 5 wait (two requests; the first waits alone whatever its size)
    assert codes.count(503) >= 2 and codes.count(200) >= 2 and set(rejected) == {"busy"}
