"""What both of proxyd's HTTP/2 ends add to h2: the graceful GOAWAY, and sending within the
flow-control windows.

h2's connection state machine, taught the graceful GOAWAY:

RFC 9113 §6.8: after a GOAWAY, the streams up to its last stream id may still complete; only
new streams are refused. h2 moves its connection to CLOSED on any GOAWAY, sent or received,
and then refuses every frame of every stream — so a drain's GOAWAY would cut the answers it
means to let finish, and an upstream's graceful GOAWAY (gRPC servers send one at their
connection age limit) would fail the calls in flight. A connection given ``graceful`` keeps
taking and sending frames in CLOSED; proxyd itself refuses new streams once a GOAWAY went
either way (h2_connection.py, h2_upstream.py), and a connection error still closes the socket.
"""

from __future__ import annotations

from typing import Any, Final

from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError

__all__ = ["graceful", "send_within_windows"]


def _table() -> dict[Any, Any]:
    table: dict[Any, Any] = dict(H2Connection().state_machine._transitions)
    for input_ in ConnectionInputs:
        table.setdefault((ConnectionState.CLOSED, input_), (None, ConnectionState.CLOSED))
    return table


GRACEFUL: Final = _table()


def graceful(conn: H2Connection) -> H2Connection:
    """``conn``, whose streams may finish after a GOAWAY (its own table shadows the class's)."""
    conn.state_machine._transitions = GRACEFUL
    return conn


def send_within_windows(h2: H2Connection, stream_id: int, data: bytes) -> int:
    """DATA frames for as much of ``data`` as the stream's and the connection's send windows
    (and the peer's frame size) allow; how many bytes went, or -1 when the stream is gone."""
    at, size = 0, len(data)
    try:
        while at < size:
            room = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
            if room <= 0:
                break
            piece = data[at:at + room] if at or size > room else data
            h2.send_data(stream_id, piece)
            at += len(piece)
    except (ProtocolError, StreamClosedError, FlowControlError):
        return -1
    return at
