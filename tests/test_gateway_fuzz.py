"""Whatever a voice gateway sends, the client's reader survives it: malformed JSON, wrong types in
``d``, huge or non-finite numbers, unknown ops, truncated binary frames. Every message goes through
the same entry points the websocket reader uses (``_on_text`` / ``_on_binary``); an exception escaping
them would end the reader (a dead connection), so none may."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from telecom.gateway import VoiceGateway, _Connection
from telecom.protocol import Opcode


class Listener:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))


class FakeWs:
    closed = False

    async def send_str(self, data):  # heartbeats started by a fuzzed Hello go nowhere
        pass

    async def close(self, **kwargs):
        self.closed = True


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
KEYS = ["heartbeat_interval", "t", "user_id", "ssrc", "speaking", "user_ids", "ip", "port", "modes",
        "mode", "secret_key", "dave_protocol_version", "transition_id", "protocol_version", "epoch"]
d_value = st.one_of(json_value, st.dictionaries(st.sampled_from(KEYS), json_value, max_size=6))
ops = st.one_of(st.sampled_from([int(o) for o in Opcode]), st.integers(-5, 300), json_leaf)


def _texts():
    message = st.fixed_dictionaries({"op": ops, "d": d_value},
                                     optional={"seq": json_leaf, "t": json_leaf})
    as_json = message.map(lambda m: json.dumps(m, allow_nan=True))
    return st.one_of(as_json, st.text(max_size=40), as_json.map(lambda s: s[: len(s) // 2]))


def _gateway():
    gw = VoiceGateway(endpoint="ws://127.0.0.1:9/", server_id=1, user_id=2, session_id="s",
                      token="t", listener=Listener())
    return gw


async def _feed(texts, binaries, gw=None):
    gw = gw or _gateway()
    for resuming in (False, True):
        conn = _Connection(FakeWs(), resuming)
        for text in texts:
            gw._on_text(conn, text)
        for data in binaries:
            gw._on_binary(conn, data)
        if conn.heartbeat_task is not None:
            conn.heartbeat_task.cancel()
    return gw


@settings(max_examples=300, deadline=None)
@given(st.lists(_texts(), max_size=6), st.lists(st.binary(max_size=40), max_size=4))
def test_the_reader_survives_any_message(texts, binaries):
    gw = asyncio.run(_feed(texts, binaries))
    assert gw.last_seq is None or isinstance(gw.last_seq, int)


def test_non_finite_and_huge_numbers_in_known_ops_are_ignored():
    texts = [
        '{"op": 5, "d": {"user_id": 1e999, "ssrc": 1, "speaking": 1}}',
        '{"op": 5, "d": {"user_id": "12", "ssrc": NaN, "speaking": 1}}',
        '{"op": 11, "d": {"user_ids": [1e999]}}',
        '{"op": 13, "d": {"user_id": -Infinity}}',
        '{"op": 8, "d": {"heartbeat_interval": 1e999}}',
        '{"op": 8, "d": {"heartbeat_interval": -5}}',
        '{"op": 6, "d": {"t": 1e999}}',
    ]
    listener = Listener()
    gw = VoiceGateway(endpoint="ws://127.0.0.1:9/", server_id=1, user_id=2, session_id="s",
                      token="t", listener=listener)
    asyncio.run(_feed(texts + ['{"op": 5, "d": {"user_id": "7", "ssrc": 9, "speaking": 1}}'],
                      [b"\x00", b"\x00\x01\x19", b"\x00\x02\xff"], gw))
    # Only the one well-formed Speaking got through (delivered by the resuming connection; a fresh
    # one holds events until its session is ready).
    speaking = [args for name, args in listener.calls if name == "on_speaking"]
    assert speaking == [(7, 9, 1)]
