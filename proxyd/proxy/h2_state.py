"""h2's connection state machine, taught the graceful GOAWAY.

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

__all__ = ["graceful"]


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
