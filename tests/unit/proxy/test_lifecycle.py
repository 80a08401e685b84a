"""The exchange's states and their moves (lifecycle.py), and that an exchange keeps to them."""

from __future__ import annotations

import asyncio

import pytest

from proxyd.config.models import GatewayConfig
from proxyd.proxy import lifecycle
from proxyd.proxy.connection import ClientConnection
from proxyd.proxy.exchange import Exchange
from proxyd.proxy.pipeline import Pipeline
from proxyd.proxy.request import Request

STATES = range(len(lifecycle.NAMES))


def test_every_state_has_a_name_and_a_row() -> None:
    assert len(lifecycle.MOVES) == len(lifecycle.NAMES)
    for state in STATES:
        assert getattr(lifecycle, lifecycle.NAMES[state]) == state


def test_final_states_go_nowhere_and_every_live_state_can_end() -> None:
    assert [s for s in STATES if lifecycle.MOVES[s] == 0] == [lifecycle.TUNNEL, lifecycle.DONE]
    for state in STATES:
        if state not in (lifecycle.TUNNEL, lifecycle.DONE):
            assert lifecycle.legal(state, lifecycle.DONE), lifecycle.NAMES[state]


def test_moves_go_forward_except_a_retry() -> None:
    for state in STATES:
        for to in STATES:
            if lifecycle.legal(state, to) and to < state:
                names = lifecycle.NAMES
                assert to == lifecycle.CONNECTING, f"{names[state]} -> {names[to]}"
                assert lifecycle.RETRYABLE >> state & 1, lifecycle.NAMES[state]


def test_no_retry_once_the_client_may_have_a_response_byte() -> None:
    for state in (lifecycle.BUFFERING, lifecycle.RELAYING, lifecycle.TUNNEL, lifecycle.DONE):
        assert not lifecycle.legal(state, lifecycle.CONNECTING)
        assert not lifecycle.RETRYABLE >> state & 1
    for state in (lifecycle.CONNECTING, lifecycle.SENDING, lifecycle.AWAITING_HEAD):
        assert lifecycle.legal(state, lifecycle.CONNECTING)


def test_a_tunnel_begins_only_on_a_whole_request() -> None:
    # An upgrade is never made for a request with a body (connection.UpgradeBody).
    tunnels_from = [s for s in STATES if lifecycle.legal(s, lifecycle.TUNNEL)]
    assert tunnels_from == [lifecycle.AWAITING_HEAD]


def test_an_exchange_refuses_a_move_the_table_does_not_allow() -> None:
    loop = asyncio.new_event_loop()
    try:
        pipeline = Pipeline(GatewayConfig.model_validate({}), loop)
        ex = Exchange(ClientConnection(pipeline), Request())
        assert ex.state == lifecycle.ROUTING
        ex._move(lifecycle.IN_CHAIN)
        with pytest.raises(RuntimeError, match="from IN_CHAIN to RELAYING"):
            ex._move(lifecycle.RELAYING)
        assert ex.state == lifecycle.IN_CHAIN
        pipeline.close()
    finally:
        loop.close()
