"""The exchange's states and their moves (lifecycle.py), and that an exchange keeps to them."""

from __future__ import annotations

import asyncio

import pytest

from proxyd.config.models import GatewayConfig
from proxyd.proxy import lifecycle
from proxyd.proxy.connection import ClientConnection
from proxyd.proxy.exchange import Exchange
from proxyd.proxy.lifecycle import (
    AWAITING_HEAD,
    BUFFERING,
    CONNECTING,
    DONE,
    IN_CHAIN,
    MOVES,
    NAMES,
    RELAYING,
    RETRYABLE,
    ROUTING,
    SENDING,
    TUNNEL,
    legal,
)
from proxyd.proxy.pipeline import Pipeline
from proxyd.proxy.request import Request

STATES = range(len(NAMES))


def test_every_state_has_a_name_and_a_row() -> None:
    assert len(MOVES) == len(NAMES)
    for state in STATES:
        assert getattr(lifecycle, NAMES[state]) == state


def test_final_states_go_nowhere_and_every_live_state_can_end() -> None:
    assert [s for s in STATES if MOVES[s] == 0] == [TUNNEL, DONE]
    for state in STATES:
        if state not in (TUNNEL, DONE):
            assert legal(state, DONE), NAMES[state]


def test_moves_go_forward_except_a_retry() -> None:
    for state in STATES:
        for to in STATES:
            if legal(state, to) and to < state:
                assert to == CONNECTING, f"{NAMES[state]} -> {NAMES[to]}"
                assert RETRYABLE >> state & 1, NAMES[state]


def test_no_retry_once_the_client_may_have_a_response_byte() -> None:
    for state in (BUFFERING, RELAYING, TUNNEL, DONE):
        assert not legal(state, CONNECTING)
        assert not RETRYABLE >> state & 1
    for state in (CONNECTING, SENDING, AWAITING_HEAD):
        assert legal(state, CONNECTING)


def test_a_tunnel_begins_only_on_a_whole_request() -> None:
    # An upgrade is never made for a request with a body (connection.UpgradeBody).
    assert [s for s in STATES if legal(s, TUNNEL)] == [AWAITING_HEAD]


def test_an_exchange_refuses_a_move_the_table_does_not_allow() -> None:
    loop = asyncio.new_event_loop()
    try:
        pipeline = Pipeline(GatewayConfig.model_validate({}), loop)
        ex = Exchange(ClientConnection(pipeline), Request())
        assert ex.state == ROUTING
        ex._move(IN_CHAIN)
        with pytest.raises(RuntimeError, match="from IN_CHAIN to RELAYING"):
            ex._move(RELAYING)
        assert ex.state == IN_CHAIN
        pipeline.close()
    finally:
        loop.close()
