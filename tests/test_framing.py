"""The length-prefixed Opus packet framing of ``POST .../tracks/{id}/opus`` (telecom._framing): what the
client writes the node reads back, and every malformed body is refused with where it went wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telecom._framing import MAX_OPUS_PACKET, pack_length_prefixed, split_length_prefixed

packets = st.lists(st.binary(min_size=1, max_size=MAX_OPUS_PACKET), max_size=20)


@given(packets)
def test_split_reads_back_what_pack_wrote(items):
    body = pack_length_prefixed(items)
    assert len(body) == sum(2 + len(p) for p in items)
    assert split_length_prefixed(body) == items


@given(packets, st.data())
def test_a_truncated_body_is_refused_unless_cut_between_packets(items, data):
    body = pack_length_prefixed(items)
    ends = [0]                                   # where each packet's framing ends
    for p in items:
        ends.append(ends[-1] + 2 + len(p))
    length = data.draw(st.integers(min_value=0, max_value=len(body)))
    if length in ends:
        assert split_length_prefixed(body[:length]) == items[:ends.index(length)]
    else:
        with pytest.raises(ValueError, match="the body ends inside|needs"):
            split_length_prefixed(body[:length])


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="packet 1 has length 0"):
        split_length_prefixed(b"\x00\x01a\x00\x00")
    with pytest.raises(ValueError, match="length 1276"):
        split_length_prefixed((1276).to_bytes(2, "big") + bytes(1276))
    with pytest.raises(ValueError, match="packet 0 is 0 bytes"):
        pack_length_prefixed([b""])
    with pytest.raises(ValueError, match="packet 1 is 1276 bytes"):
        pack_length_prefixed([b"a", bytes(1276)])
    assert split_length_prefixed(b"") == []
