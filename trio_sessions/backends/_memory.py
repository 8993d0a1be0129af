"""MemoryBroker: an in-process broker with Service Bus session semantics on Trio's clock.

It is the reference implementation of the backend seam, the embedded default for demos
and local development, and the test double: under `trio.testing.MockClock` lock expiry,
message expiry and server-side waits happen in virtual time.

Data layout, per entity (a queue or a topic's subscription):

* each session keeps its available messages in a heap by sequence number, so messages
  returned by abandon or lock loss (which were sent before every undelivered one) are
  delivered again first, in sequence-number order;
* a heap of ``(oldest available sequence number, session id)`` over unlocked sessions
  hands out the next available session oldest-message-first in O(log n); entries are
  checked when popped, so stale ones cost nothing but a pop;
* a heap of lock deadlines finds expired session locks without scanning.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
import random
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import trio
import trio.lowlevel

from .._errors import (
    EntityNotFoundError,
    MessageAlreadySettledError,
    MessageLockLostError,
    MessageNotFoundError,
    MessageSizeExceededError,
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
    SessionsNotEnabledError,
)
from .._messages import (
    Abandon,
    Complete,
    DeadLetter,
    EntityPath,
    Message,
    ReceivedMessage,
    Settlement,
)
from .._options import ReceiveMode
from ._abc import SingleSettlements

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterable, Sequence
    from types import TracebackType

    from ._abc import Backend, SessionLink

__all__ = ["MemoryBroker", "MemoryReceiver", "MemorySessionLink"]

#: Dead-letter reasons Service Bus itself uses.
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
TTL_EXPIRED = "TTLExpiredException"
SESSION_ID_MISSING = "SessionIdIsMissing"

#: The largest message Service Bus Standard takes (Premium: up to 100 MB), and so the
#: largest session state ("the size of one message", Service Bus docs, message sessions).
MAX_MESSAGE_SIZE = 256 * 1024


def _value_size(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, bool | int | float):
        return 8
    return len(str(value).encode("utf-8"))


def message_size(message: Message) -> int:
    """The bytes a message carries: body, properties and application properties.

    A lower bound of its AMQP encoding (which adds type codes and lengths), so a message
    the SDK lets through on the wire is never refused here.
    """
    size = len(message.body)
    for text in (
        message.session_id,
        message.message_id,
        message.content_type,
        message.correlation_id,
        message.subject,
    ):
        if text is not None:
            size += len(text.encode("utf-8"))
    for key, value in (message.application_properties or {}).items():
        size += len(key.encode("utf-8")) + _value_size(value)
    return size


#: Operations `MemoryBroker.fail_next` can make fail.
FAULT_OPERATIONS = frozenset(
    {
        "accept_session",
        "receive",
        "complete",
        "abandon",
        "dead_letter",
        "defer",
        "receive_deferred",
        "renew_lock",
        "get_state",
        "set_state",
        "send",
    }
)


def _check_duration(name: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be seconds (int or float), not {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


def _operation(settlement: Settlement) -> str:
    """The `MemoryBroker.fail_next` name of a settlement."""
    if isinstance(settlement, Complete):
        return "complete"
    if isinstance(settlement, Abandon):
        return "abandon"
    if isinstance(settlement, DeadLetter):
        return "dead_letter"
    return "defer"


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{kind} name must be a non-empty str without '/', got {name!r}")
    return name


@attrs.define(eq=False)
class _Record:
    """One stored message of one entity."""

    sequence_number: int
    message: Message
    message_id: str
    session_id: str | None
    enqueued_at: float
    expires_at: float
    delivery_count: int = 0
    deferred: bool = False
    lock_token: str | None = None
    dead_letter_reason: str | None = None
    dead_letter_error_description: str | None = None
    enqueued_utc: dt.datetime | None = None  # `enqueued_at` as UTC, once first delivered


class _Signal:
    """Wakes the tasks waiting on it now (an `Event` that resets itself at once).

    One lives as long as its session or entity: a wake-up costs nothing when no task
    waits, and no new `trio.Event` (and its set of tasks) is made per wake-up, as each
    lock release and each message for a held session did before. A session's signal
    has one waiter at most (its holder's receive), kept without a set.
    """

    __slots__ = ("_more", "_one")

    def __init__(self) -> None:
        self._one: trio.lowlevel.Task | None = None
        self._more: set[trio.lowlevel.Task] | None = None

    async def wait(self) -> None:
        """Wait until the next `set` (a checkpoint, cancellable as ever)."""
        task = trio.lowlevel.current_task()
        if self._one is None:
            self._one = task
        else:
            if self._more is None:
                self._more = set()
            self._more.add(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._one is task:
                self._one = None
            elif self._more is not None:
                self._more.discard(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def set(self) -> None:
        """Wake every task waiting now; later waits wait for the next `set`."""
        one, more = self._one, self._more
        if one is not None:
            self._one = None
            trio.lowlevel.reschedule(one)
        if more:
            self._more = None
            for task in more:
                trio.lowlevel.reschedule(task)

    def waiting(self) -> int:
        """How many tasks wait now."""
        return (self._one is not None) + len(self._more or ())


@attrs.define(eq=False)
class _Session:
    session_id: str
    available: list[tuple[int, _Record]] = attrs.field(factory=list)
    deferred: dict[int, _Record] = attrs.field(factory=dict)
    locked: dict[str, _Record] = attrs.field(factory=dict)
    state: bytes | None = None
    link: MemorySessionLink | None = None
    locked_until: float = -math.inf
    arrived: _Signal = attrs.field(factory=_Signal)
    # `locked_until` as UTC, for the messages received under it (one conversion a lock,
    # not one a message).
    locked_utc: tuple[float, dt.datetime] | None = None

    def locked_until_utc(self, broker: MemoryBroker) -> dt.datetime:
        cached = self.locked_utc
        if cached is None or cached[0] != self.locked_until:
            cached = self.locked_utc = (self.locked_until, broker._utc(self.locked_until))
        return cached[1]

    def wake_receiver(self) -> None:
        self.arrived.set()

    def is_empty(self) -> bool:
        return not (self.available or self.deferred or self.locked or self.state is not None)


@attrs.define(eq=False)
class _Entity:
    path: str
    requires_session: bool
    lock_duration: float
    max_delivery_count: int
    default_message_time_to_live: float | None
    dead_lettering_on_message_expiration: bool
    sequence: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    sessions: dict[str, _Session] = attrs.field(factory=dict)
    ready: list[tuple[int, str]] = attrs.field(factory=list)
    lock_deadlines: list[tuple[float, int, str]] = attrs.field(factory=list)
    changed: _Signal = attrs.field(factory=_Signal)
    dead_letters: list[_Record] = attrs.field(factory=list)
    expired: list[_Record] = attrs.field(factory=list)
    completed: list[_Record] = attrs.field(factory=list)
    # Entities without sessions lock each message: token -> (deadline, record, receiver).
    message_locks: dict[str, tuple[float, _Record, MemoryReceiver]] = attrs.field(factory=dict)
    message_lock_deadlines: list[tuple[float, str]] = attrs.field(factory=list)
    # Scheduled messages, not yet enqueued: sequence number -> record, and a heap of
    # (due time, sequence number); cancelled ones leave stale heap entries behind.
    scheduled: dict[int, _Record] = attrs.field(factory=dict)
    scheduled_due: list[tuple[float, int]] = attrs.field(factory=list)
    # Whether any message stored here ever had a time to live: if none did, inspection
    # need not look through every session for expired messages.
    may_expire: bool = False

    def next_due(self) -> float:
        """When the next scheduled message is due (Trio clock), or infinity."""
        return self.scheduled_due[0][0] if self.scheduled_due else math.inf

    def notify(self) -> None:
        """Wake every waiting accept: a session may have become available."""
        self.changed.set()


@attrs.define(eq=False)
class _Topic:
    name: str
    subscriptions: dict[str, _Entity] = attrs.field(factory=dict)
    # A topic numbers its messages once; each subscription's copy keeps that number.
    sequence: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))


class MemoryBroker:
    """An in-process Service Bus with sessions, on Trio's clock.

    Create entities, send messages, and pass the broker to `open_session_manager`::

        broker = MemoryBroker()
        broker.create_queue("orders", lock_duration=30)
        await broker.send("orders", Message(b"created", session_id="order-1"))

    Semantics follow Service Bus: FIFO per session; one receiver holds a session lock at
    a time, until it closes the session or the lock expires ``lock_duration`` seconds
    after accept or the last renewal; settling on an expired lock raises
    `SessionLockLostError`; abandon increments ``delivery_count`` and delivers the
    message again first; reaching ``max_delivery_count`` moves it to the dead-letter
    queue with reason ``MaxDeliveryCountExceeded``; deferred messages are reachable only
    by sequence number; session state outlives the lock.

    Timestamps are Trio-clock times at one fixed offset from UTC (fixed at first use),
    so under `trio.testing.MockClock` they follow virtual time.

    It is also a (no-op) async context manager, so code can treat every backend alike.

    Args:
        record_completed: keep every completed message, for `completed_messages` (tests
            and history checkers; off by default so long runs do not grow).
    """

    def __init__(self, *, record_completed: bool = False) -> None:
        self._record_completed = record_completed
        self._queues: dict[str, _Entity] = {}
        self._topics: dict[str, _Topic] = {}
        self._entities: dict[str, _Entity] = {}
        self._utc_offset: float | None = None
        # Lock tokens: a random 80-bit prefix per broker, then a 48-bit counter (from a
        # random start), in the canonical form of a UUID: see `_new_token`.
        prefix = f"{random.getrandbits(80):020x}"
        self._token_prefix = f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:16]}-{prefix[16:]}-"
        self._tokens = itertools.count(random.getrandbits(47))
        self._lock_ids = itertools.count()
        self._faults: dict[str, deque[BaseException]] = {}

    # -- context manager ---------------------------------------------------------------

    async def __aenter__(self) -> MemoryBroker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # -- management ----------------------------------------------------------------------

    def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = True,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        default_message_time_to_live: float | None = None,
        dead_lettering_on_message_expiration: bool = False,
    ) -> None:
        """Create a queue.

        Raises:
            ValueError: the name is taken or invalid, or a setting is out of range.
            TypeError: a setting has the wrong type.
        """
        _check_name("queue", name)
        if name in self._queues or name in self._topics:
            raise ValueError(f"an entity named {name!r} exists already")
        entity = self._make_entity(
            name,
            requires_session=requires_session,
            lock_duration=lock_duration,
            max_delivery_count=max_delivery_count,
            default_message_time_to_live=default_message_time_to_live,
            dead_lettering_on_message_expiration=dead_lettering_on_message_expiration,
        )
        self._queues[name] = entity
        self._entities[name] = entity

    def create_topic(self, name: str) -> None:
        """Create a topic; messages sent to it fan out to its subscriptions."""
        _check_name("topic", name)
        if name in self._queues or name in self._topics:
            raise ValueError(f"an entity named {name!r} exists already")
        self._topics[name] = _Topic(name)

    def create_subscription(
        self,
        topic: str,
        name: str,
        *,
        requires_session: bool = True,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        default_message_time_to_live: float | None = None,
        dead_lettering_on_message_expiration: bool = False,
    ) -> None:
        """Create a subscription of ``topic``; its path is ``"<topic>/subscriptions/<name>"``.

        Raises:
            EntityNotFoundError: no such topic.
            ValueError: the name is taken or invalid, or a setting is out of range.
        """
        _check_name("subscription", name)
        if topic not in self._topics:
            raise EntityNotFoundError(f"no topic named {topic!r}")
        subscriptions = self._topics[topic].subscriptions
        if name in subscriptions:
            raise ValueError(f"topic {topic!r} has a subscription named {name!r} already")
        path = f"{topic}/subscriptions/{name}"
        entity = self._make_entity(
            path,
            requires_session=requires_session,
            lock_duration=lock_duration,
            max_delivery_count=max_delivery_count,
            default_message_time_to_live=default_message_time_to_live,
            dead_lettering_on_message_expiration=dead_lettering_on_message_expiration,
        )
        subscriptions[name] = entity
        self._entities[path] = entity

    def _make_entity(
        self,
        path: str,
        *,
        requires_session: bool,
        lock_duration: float,
        max_delivery_count: int,
        default_message_time_to_live: float | None,
        dead_lettering_on_message_expiration: bool,
    ) -> _Entity:
        if not isinstance(requires_session, bool):
            raise TypeError(f"requires_session must be True or False, not {requires_session!r}")
        if not isinstance(dead_lettering_on_message_expiration, bool):
            raise TypeError(
                "dead_lettering_on_message_expiration must be True or False, "
                f"not {dead_lettering_on_message_expiration!r}"
            )
        if isinstance(max_delivery_count, bool) or not isinstance(max_delivery_count, int):
            raise TypeError(f"max_delivery_count must be an int, not {max_delivery_count!r}")
        if max_delivery_count < 1:
            raise ValueError(f"max_delivery_count must be >= 1, got {max_delivery_count!r}")
        duration = _check_duration("lock_duration", lock_duration)
        ttl = _check_duration(
            "default_message_time_to_live", default_message_time_to_live, allow_none=True
        )
        assert duration is not None
        return _Entity(
            path,
            requires_session=requires_session,
            lock_duration=duration,
            max_delivery_count=max_delivery_count,
            default_message_time_to_live=ttl,
            dead_lettering_on_message_expiration=dead_lettering_on_message_expiration,
        )

    # -- sending -------------------------------------------------------------------------

    async def send(self, entity: str, messages: Message | Sequence[Message]) -> None:
        """Send one message, or a list of messages as one batch, to a queue or topic.

        A batch is checked whole before any of it is stored.

        Raises:
            EntityNotFoundError: no queue or topic named ``entity``.
            TypeError: something other than a `Message` was given.
            ValueError: a message without ``session_id`` was sent to a queue that
                requires sessions.
            MessageSizeExceededError: a message is larger than ``MAX_MESSAGE_SIZE``
                (256 KiB, as on Service Bus Standard); nothing of the batch is stored.
        """
        await trio.lowlevel.checkpoint()
        batch = [messages] if isinstance(messages, Message) else list(messages)
        self._send_now(entity, batch)

    def _send_targets(self, entity: str) -> list[_Entity]:
        """The entities a message sent to ``entity`` (a queue or topic) is stored in."""
        if entity in self._queues:
            return [self._queues[entity]]
        if entity in self._topics:
            return list(self._topics[entity].subscriptions.values())
        if "/subscriptions/" in entity:
            raise EntityNotFoundError(f"cannot send to subscription {entity!r}: send to its topic")
        raise EntityNotFoundError(f"no queue or topic named {entity!r}")

    def _send_now(self, entity: str, batch: list[Message]) -> list[int]:
        """Check a whole batch, then store it (the synchronous part of `send`); return the
        messages' sequence numbers."""
        for item in batch:
            if not isinstance(item, Message):
                raise TypeError(f"send takes Message objects, not {type(item).__name__}")
            size = message_size(item)
            if size > MAX_MESSAGE_SIZE:
                raise MessageSizeExceededError(
                    f"message {item.message_id!r} of session {item.session_id!r} has "
                    f"{size} bytes of body and properties; Service Bus (Standard) takes at "
                    f"most {MAX_MESSAGE_SIZE} bytes (256 KiB)"
                )
        targets = self._send_targets(entity)
        if entity in self._queues and targets[0].requires_session:
            for item in batch:
                if item.session_id is None:
                    raise ValueError(
                        f"queue {entity!r} requires sessions: every Message needs a session_id"
                    )
        self._inject("send")
        now = trio.current_time()
        numbers = self._topics[entity].sequence if entity in self._topics else targets[0].sequence
        sequence_numbers = []
        for item in batch:
            seq = next(numbers)
            sequence_numbers.append(seq)
            for target in targets:
                self._store(target, item, now, seq)
        return sequence_numbers

    async def schedule_messages(
        self,
        entity: str,
        messages: Message | Sequence[Message],
        enqueue_time: dt.datetime,
    ) -> list[int]:
        """Send messages that are enqueued only at ``enqueue_time`` (timezone-aware).

        Until then they are not delivered, not counted as active, and can be cancelled
        with `cancel_scheduled_messages`; `peek_messages` shows them. Returns their
        sequence numbers (on a topic, the number every subscription's copy has).

        Raises:
            EntityNotFoundError: no queue or topic named ``entity``.
            TypeError: something other than a `Message` was given, or ``enqueue_time``
                is not a datetime.
            ValueError: ``enqueue_time`` is naive (no timezone), or a message without
                ``session_id`` was sent to a queue that requires sessions.
        """
        await trio.lowlevel.checkpoint()
        batch = [messages] if isinstance(messages, Message) else list(messages)
        for item in batch:
            if not isinstance(item, Message):
                raise TypeError(
                    f"schedule_messages takes Message objects, not {type(item).__name__}"
                )
        return self._send_now(
            entity, [attrs.evolve(m, scheduled_enqueue_time=enqueue_time) for m in batch]
        )

    async def cancel_scheduled_messages(self, entity: str, sequence_numbers: Sequence[int]) -> None:
        """Cancel scheduled messages of a queue or topic before they are enqueued.

        Raises:
            EntityNotFoundError: no queue or topic named ``entity``.
            MessageNotFoundError: a sequence number is not that of a message still
                scheduled; then nothing is cancelled.
        """
        await trio.lowlevel.checkpoint()
        self._cancel_scheduled_now(entity, sequence_numbers)

    def _cancel_scheduled_now(self, entity: str, sequence_numbers: Sequence[int]) -> None:
        targets = self._send_targets(entity)
        for target in targets:
            self._activate_scheduled(target)
        for seq in sequence_numbers:
            if not any(seq in target.scheduled for target in targets):
                raise MessageNotFoundError(
                    f"{entity!r} has no scheduled message with sequence number {seq}"
                )
        for target in targets:
            for seq in sequence_numbers:
                target.scheduled.pop(seq, None)

    def _store(self, entity: _Entity, message: Message, now: float, seq: int) -> None:
        ttl = message.time_to_live or entity.default_message_time_to_live
        enqueue_at = now
        if message.scheduled_enqueue_time is not None:
            enqueue_at = max(now, self._trio_time(message.scheduled_enqueue_time))
        record = _Record(
            sequence_number=seq,
            message=message,
            message_id=message.message_id or uuid.uuid4().hex,
            session_id=message.session_id,
            enqueued_at=enqueue_at,
            expires_at=enqueue_at + ttl if ttl else math.inf,
        )
        if ttl:
            entity.may_expire = True
        if enqueue_at > now:
            entity.scheduled[seq] = record
            heapq.heappush(entity.scheduled_due, (enqueue_at, seq))
            # Waiting receivers recompute when to wake: accepts and plain receivers wait
            # on the entity, a session's holder on its session.
            entity.notify()
            session = entity.sessions.get(message.session_id or "")
            if session is not None and session.link is not None:
                session.wake_receiver()
            return
        self._enqueue(entity, record)

    def _activate_scheduled(self, entity: _Entity) -> None:
        """Enqueue the scheduled messages that are due (lazily, like expiry)."""
        heap = entity.scheduled_due
        if not heap:
            return
        now = trio.current_time()
        while heap and heap[0][0] <= now:
            _, seq = heapq.heappop(heap)
            record = entity.scheduled.pop(seq, None)
            if record is not None:  # else cancelled
                self._enqueue(entity, record)

    def _enqueue(self, entity: _Entity, record: _Record) -> None:
        """Make a stored message available to receivers."""
        message = record.message
        if entity.requires_session and message.session_id is None:
            # Only reachable through a topic: Service Bus dead-letters such a message
            # in each session-enabled subscription.
            self._dead_letter(entity, record, SESSION_ID_MISSING, "the message has no SessionId")
            return
        key = message.session_id if entity.requires_session else ""
        assert key is not None
        session = entity.sessions.get(key)
        if session is None:
            session = entity.sessions[key] = _Session(key)
        was_empty = not session.available
        heapq.heappush(session.available, (record.sequence_number, record))
        if session.link is not None:
            session.wake_receiver()
        elif was_empty:
            if entity.requires_session:
                heapq.heappush(entity.ready, (record.sequence_number, key))
            entity.notify()

    # -- accepting sessions ------------------------------------------------------------------

    async def accept_session(
        self,
        entity: EntityPath,
        session_id: str | None = None,
        *,
        receive_mode: ReceiveMode = ReceiveMode.PEEK_LOCK,
        max_wait_time: float | None = None,
        prefetch_count: int = 0,
    ) -> MemorySessionLink:
        """Lock a session of ``entity``: ``session_id``, or the next available one.

        The next available session is an unlocked one with at least one message ready
        for delivery; sessions are handed out oldest ready message first, so none starves.
        Waits (on the Trio clock) up to ``max_wait_time`` seconds (forever if None).

        Raises:
            EntityNotFoundError: no such entity.
            SessionsNotEnabledError: the entity does not require sessions.
            SessionCannotBeLockedError: another receiver holds ``session_id``.
            OperationTimeoutError: no session became available within ``max_wait_time``.
        """
        await trio.lowlevel.checkpoint()
        target = self._entity(str(entity))
        if not target.requires_session:
            raise SessionsNotEnabledError(
                f"entity {target.path!r} does not require sessions: "
                "create it with requires_session=True to read it by session"
            )
        if not isinstance(receive_mode, ReceiveMode):
            raise TypeError(f"receive_mode must be a ReceiveMode, not {receive_mode!r}")
        self._inject("accept_session")
        if session_id is not None:
            self._expire_locks(target)
            self._activate_scheduled(target)
            session = target.sessions.get(session_id)
            if session is None:
                session = target.sessions[session_id] = _Session(session_id)
            elif session.link is not None:
                raise SessionCannotBeLockedError(
                    f"session {session_id!r} of {target.path!r} is locked by another receiver"
                )
            return self._lock(target, session, receive_mode)
        deadline = math.inf if max_wait_time is None else trio.current_time() + max_wait_time
        while True:
            now = trio.current_time()
            self._expire_locks(target, now)
            self._activate_scheduled(target)
            session = self._pop_ready(target, now)
            if session is not None:
                return self._lock(target, session, receive_mode, now)
            if now >= deadline:
                raise OperationTimeoutError(
                    f"no session of {target.path!r} had a message ready within "
                    f"{max_wait_time} seconds"
                )
            wake_at = min(deadline, target.next_due())
            if target.lock_deadlines:
                wake_at = min(wake_at, target.lock_deadlines[0][0])
            with trio.move_on_at(wake_at):
                await target.changed.wait()

    def open_receiver(
        self, entity: str, *, receive_mode: ReceiveMode = ReceiveMode.PEEK_LOCK
    ) -> MemoryReceiver:
        """A receiver for an entity without sessions; it locks each message on its own.

        Raises:
            EntityNotFoundError: no such entity.
            ValueError: the entity requires sessions (use `accept_session`).
        """
        target = self._entity(entity)
        if target.requires_session:
            raise ValueError(
                f"entity {target.path!r} requires sessions: accept a session to read it"
            )
        if not isinstance(receive_mode, ReceiveMode):
            raise TypeError(f"receive_mode must be a ReceiveMode, not {receive_mode!r}")
        return MemoryReceiver(self, target, receive_mode)

    def _expire_message_locks(self, entity: _Entity) -> None:
        now = trio.current_time()
        heap = entity.message_lock_deadlines
        while heap and heap[0][0] <= now:
            deadline, token = heapq.heappop(heap)
            held = entity.message_locks.get(token)
            if held is not None and held[0] == deadline:
                self._drop_message_lock(entity, token)

    def _drop_message_lock(self, entity: _Entity, token: str, *, counted: bool = True) -> None:
        """A message lock ended unsettled: the message is returned (delivery_count + 1,
        unless ``counted`` is False: it was released, never handed to user code)."""
        _, record, _ = entity.message_locks.pop(token)
        session = entity.sessions[""]
        session.locked.pop(token, None)
        if counted:
            self._return(entity, session, record)
        else:
            self._unlock_record(session, record)
        entity.notify()

    def _pop_ready(self, entity: _Entity, now: float) -> _Session | None:
        while entity.ready:
            seq, key = entity.ready[0]
            session = entity.sessions.get(key)
            if session is None or session.link is not None:
                heapq.heappop(entity.ready)
                continue
            self._purge_expired(entity, session, now)
            if not session.available:
                heapq.heappop(entity.ready)
                self._maybe_drop(entity, session)
                continue
            head = session.available[0][0]
            if head != seq:
                heapq.heapreplace(entity.ready, (head, key))
                continue
            heapq.heappop(entity.ready)
            return session
        return None

    def _lock(
        self,
        entity: _Entity,
        session: _Session,
        receive_mode: ReceiveMode,
        now: float | None = None,
    ) -> MemorySessionLink:
        link = MemorySessionLink(self, entity, session, receive_mode)
        session.link = link
        if now is None:
            now = trio.current_time()
        self._set_lock_deadline(entity, session, now + entity.lock_duration)
        return link

    def _set_lock_deadline(self, entity: _Entity, session: _Session, deadline: float) -> None:
        session.locked_until = deadline
        heapq.heappush(entity.lock_deadlines, (deadline, next(self._lock_ids), session.session_id))

    def _expire_locks(self, entity: _Entity, now: float | None = None) -> None:
        if now is None:
            now = trio.current_time()
        heap = entity.lock_deadlines
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            session = entity.sessions.get(key)
            if (
                session is not None
                and session.link is not None
                and session.locked_until == deadline
            ):
                self._unlock(entity, session, lost=True)

    def _unlock(self, entity: _Entity, session: _Session, *, lost: bool) -> None:
        """Release the session lock; unsettled messages are returned (delivery_count + 1)."""
        link = session.link
        assert link is not None
        session.link = None
        if lost:
            link._lose()
        session.locked_until = -math.inf
        if session.locked:
            locked = sorted(session.locked.values(), key=lambda record: record.sequence_number)
            session.locked.clear()
            for record in locked:
                self._return(entity, session, record)
        session.wake_receiver()
        if session.available:
            heapq.heappush(entity.ready, (session.available[0][0], session.session_id))
            entity.notify()
        self._maybe_drop(entity, session)

    def _maybe_drop(self, entity: _Entity, session: _Session) -> None:
        if session.link is None and session.is_empty():
            entity.sessions.pop(session.session_id, None)

    # -- message life cycle -----------------------------------------------------------------

    def _return(self, entity: _Entity, session: _Session, record: _Record) -> None:
        """A delivery ended without settlement: count it, then redeliver or dead-letter."""
        record.delivery_count += 1
        if record.delivery_count >= entity.max_delivery_count:
            record.lock_token = None
            session.deferred.pop(record.sequence_number, None)
            self._dead_letter(
                entity,
                record,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"delivered {record.delivery_count} times without being settled",
            )
        else:
            self._unlock_record(session, record)

    def _unlock_record(self, session: _Session, record: _Record) -> None:
        """A message's lock ended: it is available again, unless it stays deferred."""
        record.lock_token = None
        if not record.deferred:
            heapq.heappush(session.available, (record.sequence_number, record))

    def _apply(
        self, entity: _Entity, session: _Session, record: _Record, settlement: Settlement
    ) -> None:
        """What a settlement does to a locked message (its lock already taken off)."""
        record.lock_token = None
        if not isinstance(settlement, Complete) and settlement.properties_to_modify:
            old = record.message.application_properties or {}
            record.message = attrs.evolve(
                record.message,
                application_properties={**old, **settlement.properties_to_modify},
            )
        if isinstance(settlement, Complete):
            session.deferred.pop(record.sequence_number, None)
            if self._record_completed:
                entity.completed.append(record)
        elif isinstance(settlement, Abandon):
            self._return(entity, session, record)
        elif isinstance(settlement, DeadLetter):
            session.deferred.pop(record.sequence_number, None)
            self._dead_letter(entity, record, settlement.reason, settlement.error_description)
        else:
            record.deferred = True
            session.deferred[record.sequence_number] = record

    def _dead_letter(
        self, entity: _Entity, record: _Record, reason: str | None, description: str | None
    ) -> None:
        record.lock_token = None
        record.deferred = False
        record.dead_letter_reason = reason
        record.dead_letter_error_description = description
        entity.dead_letters.append(record)

    def _purge_expired(self, entity: _Entity, session: _Session, now: float) -> None:
        """Remove expired messages from the head of the session (Service Bus does it lazily too)."""
        available = session.available
        while available and available[0][1].expires_at <= now:
            self._expire(entity, heapq.heappop(available)[1])

    def _expire(self, entity: _Entity, record: _Record) -> None:
        if entity.dead_lettering_on_message_expiration:
            self._dead_letter(entity, record, TTL_EXPIRED, "the message expired")
        else:
            entity.expired.append(record)

    def _utc(self, trio_time: float) -> dt.datetime:
        if self._utc_offset is None:
            self._utc_offset = time.time() - trio.current_time()
        return dt.datetime.fromtimestamp(self._utc_offset + trio_time, dt.UTC)

    def _trio_time(self, moment: dt.datetime) -> float:
        """The Trio-clock time of a UTC moment (the inverse of `_utc`)."""
        if self._utc_offset is None:
            self._utc_offset = time.time() - trio.current_time()
        return moment.timestamp() - self._utc_offset

    def _received(
        self,
        record: _Record,
        locked_until: float | dt.datetime | None,
        *,
        peek: bool = False,
    ) -> ReceivedMessage:
        message = record.message
        enqueued = record.enqueued_utc
        if enqueued is None:
            enqueued = record.enqueued_utc = self._utc(record.enqueued_at)
        if locked_until is not None and not isinstance(locked_until, dt.datetime):
            locked_until = self._utc(locked_until)
        properties = dict(message.application_properties) if message.application_properties else {}
        if record.dead_letter_reason is not None:
            properties["DeadLetterReason"] = record.dead_letter_reason
        if record.dead_letter_error_description is not None:
            properties["DeadLetterErrorDescription"] = record.dead_letter_error_description
        return ReceivedMessage(
            body=message.body,
            session_id=record.session_id,
            message_id=record.message_id,
            sequence_number=record.sequence_number,
            delivery_count=record.delivery_count,
            enqueued_time=enqueued,
            locked_until=locked_until,
            lock_token=None if peek else record.lock_token,
            application_properties=properties,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            subject=message.subject,
            dead_letter_reason=record.dead_letter_reason,
            dead_letter_error_description=record.dead_letter_error_description,
            to=message.to,
            reply_to=message.reply_to,
            reply_to_session_id=message.reply_to_session_id,
            time_to_live=(
                None if record.expires_at == math.inf else record.expires_at - record.enqueued_at
            ),
            scheduled_enqueue_time=message.scheduled_enqueue_time,
            partition_key=message.partition_key,
        )

    def _new_token(self) -> str:
        # A UUID's canonical text (as str(uuid.UUID(...)) gives it, which the emulator
        # round-trips), made with one format of the counter: building a UUID object, or
        # formatting and slicing all 128 bits, per received message was a measurable part
        # of a receive (issue #8). Unique for 2**48 receipts of one broker.
        return f"{self._token_prefix}{next(self._tokens) & 0xFFFF_FFFF_FFFF:012x}"

    # -- fault injection -----------------------------------------------------------------

    def fail_next(self, operation: str, error: BaseException | type[BaseException]) -> None:
        """Make the next call of ``operation`` (on any session) raise ``error``.

        ``operation`` is one of ``accept_session``, ``receive``, ``complete``, ``abandon``,
        ``dead_letter``, ``defer``, ``receive_deferred``, ``renew_lock``, ``get_state``,
        ``set_state``, ``send``. Calls queue up: two calls fail the next two operations.
        """
        if operation not in FAULT_OPERATIONS:
            raise ValueError(
                f"operation must be one of {', '.join(sorted(FAULT_OPERATIONS))}; got {operation!r}"
            )
        if isinstance(error, type):
            error = error(f"injected failure of {operation}")
        self._faults.setdefault(operation, deque()).append(error)

    def _inject(self, operation: str) -> None:
        queue = self._faults.get(operation)
        if queue:
            raise queue.popleft()

    def expire_session_lock(self, entity: str, session_id: str) -> None:
        """Make the lock of ``session_id`` expire now, as if its holder stopped renewing.

        Its unsettled messages are returned (delivery_count + 1) and its holder's next
        operation raises `SessionLockLostError`. Does nothing if the session is not locked.
        """
        target = self._entity(entity)
        session = target.sessions.get(session_id)
        if session is not None and session.link is not None:
            self._unlock(target, session, lost=True)

    # -- inspection ------------------------------------------------------------------------

    def _entity(self, path: str) -> _Entity:
        try:
            return self._entities[path]
        except KeyError:
            if path in self._topics:
                raise EntityNotFoundError(
                    f"{path!r} is a topic: read one of its subscriptions, "
                    f"'{path}/subscriptions/<name>'"
                ) from None
            raise EntityNotFoundError(f"no queue or subscription named {path!r}") from None

    def _settle_pending(self, entity: _Entity) -> None:
        """Bring lazily kept state up to date: expired locks and expired messages."""
        self._expire_locks(entity)
        self._expire_message_locks(entity)
        self._activate_scheduled(entity)
        if not entity.may_expire:
            return
        now = trio.current_time()
        for session in list(entity.sessions.values()):
            if session.available and session.available[0][1].expires_at <= now:
                keep = []
                for item in session.available:
                    if item[1].expires_at <= now:
                        self._expire(entity, item[1])
                    else:
                        keep.append(item)
                heapq.heapify(keep)
                session.available = keep
                self._maybe_drop(entity, session)

    def active_message_count(self, entity: str) -> int:
        """Messages neither settled, dead-lettered nor expired: available, locked or deferred."""
        target = self._entity(entity)
        self._settle_pending(target)
        return sum(
            len(s.available) + len(s.deferred) + sum(1 for r in s.locked.values() if not r.deferred)
            for s in target.sessions.values()
        )

    def active_messages(self, entity: str) -> list[ReceivedMessage]:
        """Snapshots of the active messages (see `active_message_count`), by sequence number."""
        target = self._entity(entity)
        self._settle_pending(target)
        records: dict[int, _Record] = {}
        for session in target.sessions.values():
            records.update((seq, record) for seq, record in session.available)
            records.update(session.deferred)
            records.update((r.sequence_number, r) for r in session.locked.values())
        return [self._received(records[seq], None) for seq in sorted(records)]

    def scheduled_messages(self, entity: str) -> list[ReceivedMessage]:
        """Messages scheduled for later and not yet enqueued, by sequence number."""
        target = self._entity(entity)
        self._settle_pending(target)
        return [self._received(target.scheduled[seq], None) for seq in sorted(target.scheduled)]

    def peek_messages(
        self,
        entity: str,
        *,
        from_sequence_number: int = 1,
        max_count: int = 1,
        session_id: str | None = None,
    ) -> list[ReceivedMessage]:
        """Look at messages without locking them or counting a delivery.

        Returns up to ``max_count`` active, deferred and scheduled messages whose
        sequence number is ``from_sequence_number`` or more, in sequence-number order;
        with ``session_id``, only that session's. Peeked messages carry no lock token.

        Raises:
            EntityNotFoundError: no such entity.
            ValueError: ``max_count`` < 1.
        """
        return [
            message
            for message, _ in self._peek_now(entity, from_sequence_number, max_count, session_id)
        ]

    def _peek_now(
        self, entity: str, from_sequence_number: int, max_count: int, session_id: str | None
    ) -> list[tuple[ReceivedMessage, int]]:
        """`peek_messages` with each message's Service Bus state: 0 active, 1 deferred,
        2 scheduled (the emulator's ``x-opt-message-state``)."""
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
        target = self._entity(entity)
        self._settle_pending(target)
        records: dict[int, tuple[_Record, int]] = {}
        sessions: Iterable[_Session] = target.sessions.values()
        if session_id is not None:
            sessions = [target.sessions[session_id]] if session_id in target.sessions else []
        for session in sessions:
            for seq, record in session.available:
                records[seq] = (record, 0)
            for record in session.locked.values():
                records[record.sequence_number] = (record, 1 if record.deferred else 0)
            for seq, record in session.deferred.items():
                records[seq] = (record, 1)
        for seq, record in target.scheduled.items():
            if session_id is None or record.session_id == session_id:
                records[seq] = (record, 2)
        wanted = sorted(seq for seq in records if seq >= from_sequence_number)[:max_count]
        return [
            (self._received(records[seq][0], None, peek=True), records[seq][1]) for seq in wanted
        ]

    def dead_letter_messages(self, entity: str) -> list[ReceivedMessage]:
        """The messages in the dead-letter queue of ``entity``, oldest first."""
        target = self._entity(entity)
        self._settle_pending(target)
        return [self._received(record, None) for record in target.dead_letters]

    def expired_messages(self, entity: str) -> list[ReceivedMessage]:
        """Messages that expired (time to live) and were dropped, not dead-lettered."""
        target = self._entity(entity)
        self._settle_pending(target)
        return [self._received(record, None) for record in target.expired]

    def completed_messages(self, entity: str) -> list[ReceivedMessage]:
        """Messages completed so far, in completion order (needs ``record_completed=True``)."""
        if not self._record_completed:
            raise RuntimeError("create the broker with MemoryBroker(record_completed=True)")
        return [self._received(record, None) for record in self._entity(entity).completed]

    def session_state(self, entity: str, session_id: str) -> bytes | None:
        """The state of a session, read without locking it."""
        session = self._entity(entity).sessions.get(session_id)
        return None if session is None else session.state

    def locked_sessions(self, entity: str) -> list[str]:
        """Ids of the sessions locked by a receiver now."""
        target = self._entity(entity)
        self._expire_locks(target)
        return sorted(sid for sid, s in target.sessions.items() if s.link is not None)


class MemorySessionLink(SingleSettlements):
    """One session of a `MemoryBroker`, locked by its receiver until `aclose` or expiry."""

    def __init__(
        self,
        broker: MemoryBroker,
        entity: _Entity,
        session: _Session,
        receive_mode: ReceiveMode,
    ) -> None:
        self._broker = broker
        self._entity = entity
        self._session = session
        self._receive_mode = receive_mode
        self._lost = False
        self._closed = False
        self._lost_callback: Callable[[SessionLockLostError], None] | None = None

    def __repr__(self) -> str:
        return f"<MemorySessionLink {self._entity.path}/{self._session.session_id}>"

    @property
    def session_id(self) -> str:
        return self._session.session_id

    @property
    def locked_until(self) -> float:
        return self._session.locked_until if self._session.link is self else -math.inf

    @property
    def locked_until_utc(self) -> dt.datetime:
        return self._broker._utc(self._session.locked_until)

    def on_lock_lost(self, callback: Callable[[SessionLockLostError], None]) -> None:
        self._lost_callback = callback

    def _lost_error(self) -> SessionLockLostError:
        return SessionLockLostError(
            f"the lock of session {self._session.session_id!r} of {self._entity.path!r} "
            "expired or was lost"
        )

    def _lose(self) -> None:
        """The broker took the lock away: tell the holder (a link detach on Service Bus)."""
        self._lost = True
        callback, self._lost_callback = self._lost_callback, None
        if callback is not None and not self._closed:
            callback(self._lost_error())

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this session link was closed")
        session = self._session
        if session.link is self and trio.current_time() >= session.locked_until:
            self._broker._unlock(self._entity, session, lost=True)
        if self._lost or session.link is not self:
            raise self._lost_error()

    async def receive(self, max_count: int) -> list[ReceivedMessage]:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        return await self._receive_until(max_count, math.inf)

    async def _receive_until(self, max_count: int, deadline: float) -> list[ReceivedMessage]:
        await trio.lowlevel.checkpoint()
        session = self._session
        while True:
            self._broker._inject("receive")
            self._check()
            self._broker._activate_scheduled(self._entity)
            now = trio.current_time()
            self._broker._purge_expired(self._entity, session, now)
            if session.available:
                return self._take(max_count)
            if now >= deadline:
                return []
            with trio.move_on_at(min(session.locked_until, self._entity.next_due(), deadline)):
                await session.arrived.wait()

    def _receive_now(self, max_count: int) -> list[ReceivedMessage]:
        """The messages available now, up to ``max_count``, without waiting (the emulator
        answers a client's drain request with them)."""
        self._broker._inject("receive")
        self._check()
        return self._take(max_count)

    def _take(self, max_count: int) -> list[ReceivedMessage]:
        broker = self._broker
        session = self._session
        now = trio.current_time()
        out: list[ReceivedMessage] = []
        peek_lock = self._receive_mode is ReceiveMode.PEEK_LOCK
        while len(out) < max_count:
            broker._purge_expired(self._entity, session, now)
            if not session.available:
                break
            _, record = heapq.heappop(session.available)
            if peek_lock:
                record.lock_token = broker._new_token()
                session.locked[record.lock_token] = record
                out.append(broker._received(record, session.locked_until_utc(broker)))
            else:
                out.append(broker._received(record, None))
        return out

    def _settle_one(self, settlement: Settlement) -> None:
        message = settlement.message
        if self._receive_mode is ReceiveMode.RECEIVE_AND_DELETE:
            raise MessageAlreadySettledError(
                "messages received in RECEIVE_AND_DELETE mode are settled on receipt"
            )
        self._broker._inject(_operation(settlement))
        self._check()
        session = self._session
        if message.session_id != session.session_id:
            raise ValueError(
                f"message {message.message_id!r} belongs to session {message.session_id!r}, "
                f"not {session.session_id!r}"
            )
        record = session.locked.pop(message.lock_token or "", None)
        if record is None:
            raise MessageAlreadySettledError(
                f"message {message.message_id!r} (sequence number {message.sequence_number}) "
                "was settled already"
            )
        self._broker._apply(self._entity, session, record, settlement)

    def _release(self, message: ReceivedMessage) -> None:
        """Unlock a message the client never handed to user code: no delivery is counted
        (an AMQP ``released`` outcome; the emulator uses it)."""
        self._check()
        record = self._session.locked.pop(message.lock_token or "", None)
        if record is None:
            raise MessageAlreadySettledError(f"message {message.message_id!r} was settled already")
        self._broker._unlock_record(self._session, record)
        self._session.wake_receiver()

    async def settle(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        await trio.lowlevel.checkpoint()
        return self._settle_now(settlements)

    def settle_and_receive(
        self,
        settlements: Sequence[Settlement],
        on_settled: Callable[[list[BaseException | None]], None],
        max_count: int,
        deadline: float = math.inf,
    ) -> Coroutine[Any, Any, list[ReceivedMessage]]:
        """`settle`, then `receive` until ``deadline``, with one checkpoint (see
        `SettleAndReceive`).

        The settlements are applied when this is called, before the first checkpoint,
        so a cancellation can only arrive after them. A plain function that returns the
        receive's coroutine, to be awaited at once: one coroutine frame fewer held by
        every idle session's wait (issue #8, memory per idle session).
        """
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        on_settled(self._settle_now(settlements))
        return self._receive_until(max_count, deadline)

    def _settle_now(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        for settlement in settlements:
            try:
                self._settle_one(settlement)
            except Exception as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    async def _settle_single(self, settlement: Settlement) -> None:
        await trio.lowlevel.checkpoint()
        self._settle_one(settlement)

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        await trio.lowlevel.checkpoint()
        return self._receive_deferred_now(sequence_numbers)

    def _settle_by_token(
        self, lock_token: str, settlement: type[Settlement], **fields: Any
    ) -> None:
        """Settle a locked message known only by its lock token (the emulator's
        ``update-disposition``); raises MessageAlreadySettledError for an unknown token."""
        self._check()
        record = self._session.locked.get(lock_token)
        if record is None:
            raise MessageAlreadySettledError(f"no locked message has lock token {lock_token}")
        message = self._broker._received(record, self._session.locked_until)
        self._settle_one(settlement(message, **fields))

    def _receive_deferred_now(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        self._broker._inject("receive_deferred")
        self._check()
        if self._receive_mode is ReceiveMode.RECEIVE_AND_DELETE:
            raise MessageAlreadySettledError(
                "deferred messages cannot be received in RECEIVE_AND_DELETE mode"
            )
        session = self._session
        records = []
        for seq in sequence_numbers:
            record = session.deferred.get(seq)
            if record is None:
                raise MessageNotFoundError(
                    f"session {session.session_id!r} has no deferred message with "
                    f"sequence number {seq}"
                )
            records.append(record)
        out = []
        for record in records:
            if record.lock_token is None:
                record.lock_token = self._broker._new_token()
                session.locked[record.lock_token] = record
            out.append(self._broker._received(record, session.locked_until))
        return out

    # The synchronous cores below serve the async API and the emulator's event handling.

    def _renew_now(self) -> float:
        self._broker._inject("renew_lock")
        self._check()
        deadline = trio.current_time() + self._entity.lock_duration
        self._broker._set_lock_deadline(self._entity, self._session, deadline)
        return deadline

    def _get_state_now(self) -> bytes | None:
        self._broker._inject("get_state")
        self._check()
        return self._session.state

    def _set_state_now(self, state: bytes | None) -> None:
        if state is not None and not isinstance(state, bytes):
            raise TypeError(f"session state must be bytes or None, not {type(state).__name__}")
        if state is not None and len(state) > MAX_MESSAGE_SIZE:
            raise MessageSizeExceededError(
                f"session state of {self.session_id!r} would be {len(state)} bytes; Service "
                f"Bus (Standard) keeps at most {MAX_MESSAGE_SIZE} bytes (256 KiB, the size of "
                "one message)"
            )
        self._broker._inject("set_state")
        self._check()
        self._session.state = state

    async def renew_lock(self) -> float:
        await trio.lowlevel.checkpoint()
        return self._renew_now()

    async def get_state(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._get_state_now()

    async def set_state(self, state: bytes | None) -> None:
        await trio.lowlevel.checkpoint()
        self._set_state_now(state)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        session = self._session
        if not self._lost and session.link is self:
            self._broker._unlock(self._entity, session, lost=False)
        await trio.lowlevel.checkpoint()


class MemoryReceiver:
    """A receiver of an entity without sessions: each message is locked on its own.

    Made by `MemoryBroker.open_receiver`. A message lock lasts the entity's
    ``lock_duration`` from receipt or the last `renew_message_lock`; settling after it
    expired raises `MessageLockLostError` and the message is delivered again.
    """

    def __init__(self, broker: MemoryBroker, entity: _Entity, receive_mode: ReceiveMode) -> None:
        self._broker = broker
        self._entity = entity
        self._receive_mode = receive_mode
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryReceiver {self._entity.path}>"

    def _queue(self) -> _Session:
        sessions = self._entity.sessions
        if "" not in sessions:
            sessions[""] = _Session("")
        return sessions[""]

    async def receive(
        self, max_count: int = 1, *, max_wait_time: float | None = None
    ) -> list[ReceivedMessage]:
        """Wait up to ``max_wait_time`` seconds (forever if None) for messages; return up to
        ``max_count`` of them, oldest first, or an empty list if none came."""
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        await trio.lowlevel.checkpoint()
        broker = self._broker
        entity = self._entity
        deadline = math.inf if max_wait_time is None else trio.current_time() + max_wait_time
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this receiver was closed")
            broker._inject("receive")
            broker._expire_message_locks(entity)
            broker._activate_scheduled(entity)
            queue = self._queue()
            now = trio.current_time()
            out: list[ReceivedMessage] = []
            while len(out) < max_count:
                broker._purge_expired(entity, queue, now)
                if not queue.available:
                    break
                _, record = heapq.heappop(queue.available)
                if self._receive_mode is ReceiveMode.RECEIVE_AND_DELETE:
                    out.append(broker._received(record, None))
                    continue
                out.append(broker._received(record, self._lock(queue, record)))
            if out or now >= deadline:
                broker._maybe_drop(entity, queue)
                return out
            wake_at = min(deadline, entity.next_due())
            if entity.message_lock_deadlines:
                wake_at = min(wake_at, entity.message_lock_deadlines[0][0])
            with trio.move_on_at(wake_at):
                await entity.changed.wait()

    def _held(self, message: ReceivedMessage, operation: str) -> _Record:
        if self._closed:
            raise trio.ClosedResourceError("this receiver was closed")
        if self._receive_mode is ReceiveMode.RECEIVE_AND_DELETE:
            raise MessageAlreadySettledError(
                "messages received in RECEIVE_AND_DELETE mode are settled on receipt"
            )
        self._broker._inject(operation)
        self._broker._expire_message_locks(self._entity)
        held = self._entity.message_locks.get(message.lock_token or "")
        if held is None or held[2] is not self:
            raise MessageLockLostError(
                f"the lock of message {message.message_id!r} expired, or it was settled already"
            )
        return held[1]

    async def settle(self, settlement: Settlement) -> None:
        """Complete, abandon, dead-letter or defer a received message."""
        await trio.lowlevel.checkpoint()
        self._settle_one(settlement)

    def _release(self, message: ReceivedMessage) -> None:
        """Give a message back without counting a delivery (an AMQP ``released`` outcome)."""
        self._held(message, "abandon")
        self._broker._drop_message_lock(self._entity, message.lock_token or "", counted=False)

    def _settle_one(self, settlement: Settlement) -> None:
        record = self._held(settlement.message, _operation(settlement))
        token = settlement.message.lock_token or ""
        del self._entity.message_locks[token]
        queue = self._queue()
        queue.locked.pop(token, None)
        self._broker._apply(self._entity, queue, record, settlement)
        self._broker._maybe_drop(self._entity, queue)

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        """Renew one message's lock; return its new Trio-clock deadline."""
        await trio.lowlevel.checkpoint()
        self._held(message, "renew_lock")
        return self._renew(message.lock_token or "")

    def _lock(self, queue: _Session, record: _Record) -> float:
        """Lock ``record`` to this receiver under a new token; return the lock's deadline."""
        token = record.lock_token = self._broker._new_token()
        queue.locked[token] = record
        return self._set_lock_deadline(token, record)

    def _set_lock_deadline(self, token: str, record: _Record) -> float:
        deadline = trio.current_time() + self._entity.lock_duration
        self._entity.message_locks[token] = (deadline, record, self)
        heapq.heappush(self._entity.message_lock_deadlines, (deadline, token))
        return deadline

    def _renew(self, token: str) -> float:
        return self._set_lock_deadline(token, self._entity.message_locks[token][1])

    def _renew_token_now(self, token: str) -> dt.datetime:
        """Renew the lock held under ``token`` (the emulator's ``renew-lock``); when it ends."""
        self._broker._expire_message_locks(self._entity)
        held = self._entity.message_locks.get(token)
        if held is None or held[2] is not self:
            raise MessageLockLostError(f"no message is locked with lock token {token}")
        return self._broker._utc(self._renew(token))

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        """Receive deferred messages by sequence number (`MessageNotFoundError` if unknown)."""
        await trio.lowlevel.checkpoint()
        return self._receive_deferred_now(sequence_numbers)

    def _settle_by_token(
        self, lock_token: str, settlement: type[Settlement], **fields: Any
    ) -> None:
        """Settle a message known only by its lock token (the emulator's
        ``update-disposition``); MessageLockLostError if this receiver holds no such lock."""
        self._broker._expire_message_locks(self._entity)
        held = self._entity.message_locks.get(lock_token)
        if held is None or held[2] is not self:
            raise MessageLockLostError(f"no message is locked with lock token {lock_token}")
        message = self._broker._received(held[1], held[0])
        self._settle_one(settlement(message, **fields))

    def _receive_deferred_now(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        if self._closed:
            raise trio.ClosedResourceError("this receiver was closed")
        queue = self._queue()
        records = []
        for seq in sequence_numbers:
            record = queue.deferred.get(seq)
            if record is None or record.lock_token is not None:
                raise MessageNotFoundError(f"no deferred message with sequence number {seq}")
            records.append(record)
        return [self._broker._received(record, self._lock(queue, record)) for record in records]

    async def aclose(self) -> None:
        """Close the receiver: messages it still holds are returned (delivery_count + 1)."""
        if not self._closed:
            self._closed = True
            held = [t for t, (_, _, owner) in self._entity.message_locks.items() if owner is self]
            for token in held:
                self._broker._drop_message_lock(self._entity, token)
        await trio.lowlevel.checkpoint()


# The type checker confirms the reference backend matches the seam.
if __debug__:  # pragma: no branch

    def _conforms(broker: MemoryBroker, link: MemorySessionLink) -> tuple[Backend, SessionLink]:
        return broker, link

    _: Any = _conforms
