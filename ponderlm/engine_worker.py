"""The engine on a thread of its own, for a server (`ponderlm serve`): requests come in through a queue, and each
request's progress goes back to its asyncio queue on its event loop, one wake-up per loop per engine step. Only this
thread touches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass, field

from ponderlm.engine import Engine, Request


class ServerBusy(Exception):
    """The queue is full, or the server is shutting down: the client should retry later (429)."""


@dataclass
class Update:
    """A sequence's progress, copied out of the engine's thread."""

    tokens: list[int]
    extra_steps: list[int]
    finish_reason: str | None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class Ticket:
    """A request on its way through the worker, and where its updates go (an asyncio queue of a loop)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, updates: asyncio.Queue):
        self.request, self.loop, self.queue = request, loop, updates
        self.sequence = None


def _put_all(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for updates, update in items:
        updates.put_nowait(update)


class EngineWorker:
    """Owns the engine on one thread: `submit` and `cancel` queue work for it; each request's updates go to its own
    asyncio queue, on its event loop."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.in_flight = 0  # submitted and not yet finished: running rows plus the queue
        self.accepting = True
        self.tickets: dict[int, Ticket] = {}
        self.thread = threading.Thread(target=self._run, name="ponderlm-engine", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop, updates: asyncio.Queue) -> Ticket:
        """Queue a request (checked first: PonderError for a bad one, ServerBusy when full or shutting down); its
        updates will be put on `updates` in `loop`."""
        self.engine.check(request)
        with self.lock:
            if not self.accepting:
                raise ServerBusy("the server is shutting down")
            if self.in_flight >= self.engine.max_batch + self.max_queue:
                raise ServerBusy(f"{self.in_flight} requests are running or queued (--max-batch "
                                 f"{self.engine.max_batch} + --max-queue {self.max_queue}); retry shortly")
            self.in_flight += 1
        ticket = Ticket(request, loop, updates)
        self.inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone or has what it needs: free the row at the next step."""
        self.inbox.put(("cancel", ticket))

    def stop(self, timeout: float = 60.0) -> None:
        """Accept nothing new, finish what is running, then end the thread."""
        with self.lock:
            self.accepting = False
        self._stop.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout)

    def _handle(self, kind: str, ticket: Ticket | None) -> None:
        if kind == "add":
            try:
                ticket.sequence = self.engine.add(ticket.request)
            except Exception as exc:  # noqa: BLE001 - checked at submit; should it still fail, say so, live on
                with self.lock:
                    self.in_flight -= 1
                with contextlib.suppress(RuntimeError):
                    ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, exc)
                return
            self.tickets[ticket.sequence.id] = ticket
        elif kind == "cancel" and ticket.sequence is not None and not ticket.sequence.done:
            self.engine.cancel(ticket.sequence)
            self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        if self.tickets.pop(ticket.sequence.id, None) is not None:
            with self.lock:
                self.in_flight -= 1

    def _run(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait() if self.engine.busy else self.inbox.get(timeout=0.5)
                while True:
                    self._handle(*item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.engine.busy:
                try:
                    events = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - a bug must not kill the server: fail what was running
                    self._fail_all(exc)
                    continue
                self._deliver(events)
            elif self._stop.is_set():
                return

    def _deliver(self, sequences) -> None:
        """Hand each sequence's progress to its request: one wake-up of each event loop per step."""
        by_loop: dict = {}
        for sequence in sequences:
            ticket = self.tickets.get(sequence.id)
            if ticket is None:
                continue
            update = Update(list(sequence.tokens), list(sequence.extra_steps), sequence.finish_reason,
                            list(sequence.token_logprobs), list(sequence.top_logprobs))
            by_loop.setdefault(ticket.loop, []).append((ticket, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(ticket.queue, update) for ticket, update in items])
            except RuntimeError:  # that event loop is gone (the server is closing): nobody is waiting
                for ticket, _ in items:
                    self.engine.cancel(ticket.sequence)
            for ticket, _ in items:
                if ticket.sequence.done:
                    self._release(ticket)

    def _fail_all(self, exc: Exception) -> None:
        for ticket in list(self.tickets.values()):
            with contextlib.suppress(RuntimeError):
                ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, exc)
            self._release(ticket)
        self.engine = Engine(self.engine.model, self.engine.max_batch, self.engine.max_tokens)
