"""An in-process Flower ``Grid``: the same ``ServerApp`` and ``ClientApp`` as the simulation engine, with every
client run sequentially in this process (tests, machines without Ray, debugging with one stack).

Node ``k`` is client ``k`` (``node_config["partition-id"] = k``); each node keeps its ``Context`` across rounds, as
Flower's engines do. A client that raises gets an error reply (Flower's behaviour); one that takes longer than the
timeout has its reply dropped, as if it never arrived.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import Callable, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@contextlib.contextmanager
def server_identity(run_id: int = 0) -> Iterator[None]:
    """Flower stamps every new message with the sending process's task identity, which its engines set; the
    in-process engine sets it for the duration of a run (and puts the previous one back)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """Delivers each message to ``client_app`` in this process, one after another."""

    def __init__(self, client_app: ClientApp, clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.client_app, self.clock = client_app, clock
        self.contexts = {k: Context(run_id=0, node_id=k, node_config={"partition-id": k, "num-partitions": clients},
                                    state=RecordDict(), run_config={}) for k in range(clients)}
        self._run = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a SuperLink would assign
            ids.append(message.metadata.message_id)
            reply = self._deliver(message, None)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self._deliver(message, timeout)
            if reply is not None:
                replies.append(reply)
        return replies

    def _deliver(self, message: Message, timeout: float | None) -> Message | None:
        started = self.clock()
        try:
            reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply, as in Flower's engines
            reply = Message(Error(CLIENT_APP_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=message)
        if timeout is not None and self.clock() - started > timeout:
            return None
        return reply
