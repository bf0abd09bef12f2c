"""Asyncio front end over the synchronous LLMEngine.

One background thread (the engine thread) owns the engine, and so the model and the GPU: it
loads the engine, then loops: apply queued commands (add / abort), run `engine.step()`, hand the
step's outputs to the event loop in ONE `call_soon_threadsafe`. The event-loop side keeps one
RequestStream per request: an asyncio.Queue of step outputs, an incremental detokenizer and a
stop-string matcher; iterating it yields StreamDelta objects to the HTTP handlers. Closing a
stream that has not finished (client gone, server shutting down) aborts its request in the engine.

    engine = AsyncEngine(lambda: LLMEngine.from_engine_dir(path))
    engine.start()                      # loads in the background; engine.ready flips to True
    stream = engine.submit(prompt_ids, SamplingParams(max_tokens=16))
    async for delta in stream: ...      # StreamDelta(text, token_ids, finished, finish_reason)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stream_detokenizer import IncrementalDetokenizer

log = logging.getLogger("spinserve.server")

STATS_INTERVAL_S = 0.1  # engine.stats() snapshots at most this often while busy


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # shutting down: no new requests, in-flight ones finish
    STOPPED = "stopped"
    FAILED = "failed"  # the engine did not load


class EngineUnavailable(RuntimeError):
    """The engine is loading, draining, failed or full: the HTTP layer answers 503."""


@dataclass(slots=True)
class StreamDelta:
    text: str  # new text since the previous delta
    token_ids: list[int]  # new token ids since the previous delta
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far


@dataclass(slots=True)
class RequestTimes:
    arrival: float  # time.perf_counter() at submit
    first_token: float | None = None
    finished: float | None = None


class _Failure:
    """Put on a stream's queue when the engine rejected or failed its request."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class RequestStream:
    """One request's output as an async iterator of StreamDelta; close() cancels it."""

    def __init__(self, owner: AsyncEngine, request_id: str, prompt_len: int, stop: Sequence[str]):
        self.request_id = request_id
        self.num_prompt_tokens = prompt_len
        self.num_output_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.outcome: str | None = (
            None  # metrics label once done: stop/length/abort/cancelled/error
        )
        self.times = RequestTimes(arrival=time.perf_counter())
        self.detokenizer = IncrementalDetokenizer(owner.tokenizer, stop)
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        while not self.finished:
            items = [await self._queue.get()]
            while not self._queue.empty():  # coalesce outputs that piled up while we waited
                items.append(self._queue.get_nowait())
            delta = self._fold(items)
            if delta is not None:
                yield delta

    def _fold(self, items: list[Any]) -> StreamDelta | None:
        new_ids: list[int] = []
        reason = None
        for item in items:
            if isinstance(item, _Failure):
                self._finish("error")
                raise item.error
            new_ids.extend(item.new_token_ids)
            if item.finished:
                reason = _reason_str(item.finish_reason)
        if new_ids and self.times.first_token is None:
            self.times.first_token = time.perf_counter()
        self.num_output_tokens += len(new_ids)
        text = self.detokenizer.push(new_ids)
        if self.detokenizer.stopped and reason is None:
            reason = "stop"
            self._owner.abort(self.request_id)
        if reason is None:
            return (
                StreamDelta(
                    text, new_ids, False, None, self.num_prompt_tokens, self.num_output_tokens
                )
                if (text or new_ids)
                else None
            )
        text += self.detokenizer.flush()
        if self.detokenizer.stopped:
            reason = "stop"
        self._finish(reason)
        return StreamDelta(
            text, new_ids, True, reason, self.num_prompt_tokens, self.num_output_tokens
        )

    def _finish(self, outcome: str) -> None:
        self.finished = True
        self.finish_reason = outcome if outcome in ("stop", "length", "abort") else None
        self.outcome = outcome
        self.times.finished = time.perf_counter()
        self._owner._forget(self)

    def close(self) -> None:
        """Cancel if still running (client gone); idempotent."""
        if not self.finished:
            self._owner.abort(self.request_id)
            self._finish("cancelled")


def _reason_str(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    return str(value) if value is not None else "stop"


class CommandKind(enum.Enum):
    ADD = "add"
    ABORT = "abort"
    WAKE = "wake"  # no-op: unblocks the engine thread (shutdown)


@dataclass(slots=True)
class _Command:
    kind: CommandKind
    request_id: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    params: Any = None


class AsyncEngine:
    """Owns the engine thread; hands out RequestStreams on the asyncio side."""

    def __init__(
        self,
        loader: Callable[[], Any],
        *,
        max_inflight: int = 4096,
        integrity_checks: bool = False,
        on_request_done: Callable[[RequestStream], None] | None = None,
    ) -> None:
        self._loader = loader
        self._max_inflight = max_inflight
        self._integrity_checks = integrity_checks  # engine.check_integrity() whenever idle
        self._on_request_done = on_request_done
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()
        self._idle = threading.Event()  # set while the engine has nothing unfinished
        self.state = EngineState.LOADING
        self.engine: Any = None
        self.load_error: BaseException | None = None
        self.step_error: str | None = None
        self.num_steps = 0
        self.integrity_ok: bool | None = None  # result of the latest idle check_integrity()
        self.num_idle_checks = 0  # times the engine went idle (and was checked, if enabled)
        self._stats: dict[str, float] = {}
        self._stats_time = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spinserve-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_context(self) -> int:
        return int(self.engine.max_context)

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.state is EngineState.LOADING:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("engine did not load in time")
            await asyncio.sleep(0.05)
        if self.state is EngineState.FAILED:
            raise EngineUnavailable(f"engine failed to load: {self.load_error}")

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting; let in-flight requests finish for grace_s; abort the rest; stop."""
        if self.state is EngineState.READY:
            self.state = EngineState.DRAINING
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for stream in list(self._streams.values()):
            stream._put(_Failure(EngineUnavailable("server shutting down: request aborted")))
            self.abort(stream.request_id)
        self._stop_thread.set()
        self._inbox.put(_Command(CommandKind.WAKE))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        if self.state is not EngineState.FAILED:
            self.state = EngineState.STOPPED

    # ---- event-loop side -------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: Any, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request; the caller must iterate the stream and close() it when done."""
        if self.state is not EngineState.READY:
            raise EngineUnavailable(f"engine is {self.state.value}: retry later")
        if len(self._streams) >= self._max_inflight:
            raise EngineUnavailable(
                f"{len(self._streams)} requests in flight (the limit): retry later"
            )
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, len(prompt_ids), tuple(params.stop))
        self._streams[request_id] = stream
        self._inbox.put(_Command(CommandKind.ADD, request_id, list(prompt_ids), params))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Command(CommandKind.ABORT, request_id))

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None and self._on_request_done:
            self._on_request_done(stream)

    def _deliver(self, outputs: list[Any]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream._put(out)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream._put(_Failure(error))

    def stats(self) -> dict[str, float]:
        """The latest engine.stats() snapshot plus front-end counters (thread-safe copy)."""
        out = dict(self._stats)
        out["inflight_requests"] = len(self._streams)
        out["engine_steps"] = self.num_steps
        out["engine_idle_checks"] = self.num_idle_checks
        if self.integrity_ok is not None:
            out["integrity_ok"] = float(self.integrity_ok)
        return out

    # ---- engine thread ---------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _run(self) -> None:
        try:
            self.engine = self._loader()
        except BaseException as e:  # noqa: BLE001 - reported through /v2/health/ready
            log.exception("engine failed to load")
            self.load_error = e
            self.state = EngineState.FAILED
            return
        self._snapshot_stats(force=True)
        self.state = EngineState.READY
        while not self._stop_thread.is_set():
            if not self.engine.has_unfinished():
                if not self._idle.is_set():
                    self._on_idle()
                self._apply_commands(block=True)
                continue
            self._idle.clear()
            self._apply_commands(block=False)
            if self.engine.has_unfinished():
                self._step()

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: _Command) -> None:
        if cmd.kind is CommandKind.ADD:
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the loop
                self._post(self._fail, cmd.request_id, e)
        elif cmd.kind is CommandKind.ABORT:
            self.engine.abort(cmd.request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
            log.exception("engine step failed")
            self.step_error = f"{type(e).__name__}: {e}"
            self._post(self._fail_all, RuntimeError(f"engine step failed: {self.step_error}"))
            return
        self.num_steps += 1
        if outputs:
            self._post(self._deliver, outputs)
        self._snapshot_stats()

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream._put(_Failure(error))
            self.abort(stream.request_id)

    def _on_idle(self) -> None:
        self._idle.set()
        if self._integrity_checks and hasattr(self.engine, "check_integrity"):
            try:
                self.engine.check_integrity()
                self.integrity_ok = True
            except Exception:  # noqa: BLE001 - reported through metrics
                log.exception("engine integrity check failed")
                self.integrity_ok = False
        self.num_idle_checks += 1  # after the check: a reader seeing the count sees its result
        self._snapshot_stats(force=True)

    def _snapshot_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not hasattr(self.engine, "stats") or (
            not force and now - self._stats_time < STATS_INTERVAL_S
        ):
            return
        self._stats_time = now
        try:
            self._stats = {
                k: float(v)
                for k, v in dict(self.engine.stats()).items()
                if isinstance(v, (int, float))
            }
        except Exception:  # noqa: BLE001 - metrics must never break serving
            log.exception("engine.stats() failed")
