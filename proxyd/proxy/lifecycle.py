"""The states of an exchange and the moves between them, as data.

Everything that says where an exchange is lives here, apart from the I/O that moves it
(exchange.py). docs/architecture.md ("The lifecycle table") gives the outcome of every event in
every state; this table is the list of moves an exchange may make, checked on every move.

States are plain ints (the compiled build keeps them as C ints) in the order an exchange passes
through them; TUNNEL and DONE are final.
"""

from __future__ import annotations

from typing import Final

ROUTING: Final = 0  # dispatched: path normalised, route matched, the chain's request hooks
IN_CHAIN: Final = 1  # a middleware waits on I/O (Pending): its answer or the endpoint follows
CONNECTING: Final = 2  # waiting for an upstream slot (queue, breaker) or connection
SENDING: Final = 3  # the head went upstream; the client's body is still arriving
AWAITING_HEAD: Final = 4  # the whole request went upstream; no response head yet
BUFFERING: Final = 5  # the response head came; a middleware holds it for the whole body
RELAYING: Final = 6  # the response head went to the client; its body follows
TUNNEL: Final = 7  # the upstream switched protocols: the connection is a WebSocket relay
DONE: Final = 8  # answered (or abandoned): nothing more is written for it

NAMES: Final = ("ROUTING", "IN_CHAIN", "CONNECTING", "SENDING", "AWAITING_HEAD", "BUFFERING",
                "RELAYING", "TUNNEL", "DONE")


def _moves(*targets: int) -> int:
    mask = 0
    for target in targets:
        mask |= 1 << target
    return mask


# MOVES[state] has bit ``to`` set when ``state -> to`` is legal. A retry goes back to
# CONNECTING from any state before the client saw a byte of the response; every live state may
# end (DONE): an answer, an error, or the client gone. (Typed as a variable-length tuple: the
# compiled build keeps a fixed-length one unboxed and boxes all of it again for every lookup.)
MOVES: Final[tuple[int, ...]] = (
    _moves(IN_CHAIN, CONNECTING, DONE),  # ROUTING
    _moves(IN_CHAIN, CONNECTING, DONE),  # IN_CHAIN (a resumed chain may wait again)
    _moves(CONNECTING, SENDING, AWAITING_HEAD, DONE),  # CONNECTING
    _moves(CONNECTING, AWAITING_HEAD, BUFFERING, RELAYING, DONE),  # SENDING (early answer)
    _moves(CONNECTING, BUFFERING, RELAYING, TUNNEL, DONE),  # AWAITING_HEAD
    _moves(RELAYING, DONE),  # BUFFERING
    _moves(DONE),  # RELAYING
    0,  # TUNNEL
    0,  # DONE
)

# Before the first byte of a response went to the client (a 1xx aside): the states from which
# a try may be repeated.
RETRYABLE: Final = _moves(CONNECTING, SENDING, AWAITING_HEAD)


def illegal_move(state: int, to: int) -> RuntimeError:
    """A move the table does not allow: a bug in the data plane, never a client's doing.
    (A function, not an exception class: the compiled build cannot subclass RuntimeError.)"""
    return RuntimeError(f"exchange cannot move from {NAMES[state]} to {NAMES[to]}")


def legal(state: int, to: int) -> bool:
    return bool(MOVES[state] >> to & 1)
