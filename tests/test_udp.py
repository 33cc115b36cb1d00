"""telecom.udp: the IP discovery packets, the keepalive, the socket, and discovery over loopback.

The loopback responder here is a few lines of raw ``struct`` code, not telecom's: it answers the way
spec §2.1 describes (or wrongly, on purpose) so the client's matching and retrying can be checked.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from telecom.errors import ConnectTimeout, PacketError
from telecom.udp import (
    build_discovery_request,
    build_keepalive,
    ip_discovery,
    open_voice_socket,
    parse_discovery_response,
)


def response(ssrc: int, ip: bytes = b"203.0.113.7", port: int = 50004, type_: int = 2,
             length: int = 70) -> bytes:
    return struct.pack(">HHI64sH", type_, length, ssrc, ip, port)


# -- packets ------------------------------------------------------------------------------------


def test_discovery_request_is_74_zero_filled_bytes():
    request = build_discovery_request(0xDEADBEEF)
    assert len(request) == 74
    assert request[:8] == bytes.fromhex("00010046deadbeef")  # type 1, length 70, ssrc (big-endian)
    assert request[8:] == bytes(66)


@pytest.mark.parametrize("ssrc", [-1, 1 << 32])
def test_discovery_request_rejects_a_non_uint32_ssrc(ssrc):
    with pytest.raises(ValueError):
        build_discovery_request(ssrc)


def test_discovery_response_parsed():
    assert parse_discovery_response(response(42, b"198.51.100.23", 61234), 42) == ("198.51.100.23", 61234)
    assert parse_discovery_response(response(7, b"2001:db8::5", 443), 7) == ("2001:db8::5", 443)


@pytest.mark.parametrize(
    "data, problem",
    [
        (response(42)[:73], "short"),
        (b"", "short"),
        (response(42, type_=1), "type"),  # our own request echoed back
        (response(42, length=66), "length"),
        (response(43), "ssrc"),
        (response(42, ip=b""), "address"),
        (response(42, ip=b"not-an-ip"), "address"),
        (response(42, ip=b"\xff\xfe"), "address"),
        (response(42, port=0), "port"),
    ],
)
def test_malformed_discovery_response_is_a_packet_error(data, problem):
    with pytest.raises(PacketError, match=problem):
        parse_discovery_response(data, 42)


def test_keepalive_is_8_bytes_little_endian_counter():
    assert build_keepalive(0) == bytes(8)
    assert build_keepalive(0x01020304) == bytes.fromhex("0403020100000000")
    assert build_keepalive((1 << 32) + 5) == bytes.fromhex("0500000000000000")  # wraps as a uint32


# -- the socket and discovery over loopback ----------------------------------------------------------


class Responder(asyncio.DatagramProtocol):
    """Answers discovery requests; ``script`` says what to send for the n-th request."""

    def __init__(self, script):
        self.script = script
        self.requests: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.requests.append(data)
        for reply in self.script(len(self.requests), data, addr):
            self.transport.sendto(reply, addr)


async def start_responder(script):
    loop = asyncio.get_running_loop()
    transport, responder = await loop.create_datagram_endpoint(
        lambda: Responder(script), local_addr=("127.0.0.1", 0)
    )
    return transport, responder, transport.get_extra_info("sockname")[1]


def honest(n, data, addr):
    (ssrc,) = struct.unpack_from(">I", data, 4)
    return [response(ssrc, addr[0].encode(), addr[1])]


def test_open_voice_socket_is_connected_and_non_blocking():
    sock = open_voice_socket("127.0.0.1", 9)
    try:
        assert sock.type == socket.SOCK_DGRAM
        assert sock.getpeername() == ("127.0.0.1", 9)
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 64 * 1024
    finally:
        sock.close()


def test_ip_discovery_returns_the_address_the_server_saw():
    async def main():
        transport, responder, port = await start_responder(honest)
        sock = open_voice_socket("127.0.0.1", port)
        try:
            found = await ip_discovery(asyncio.get_running_loop(), sock, 1234, timeout=1.0)
            assert found == sock.getsockname()
            assert responder.requests == [build_discovery_request(1234)]
            # The same socket still works for the engine afterwards: plain send() on it.
            sock.send(build_keepalive(1))
            await asyncio.sleep(0.05)
            assert responder.requests[-1] == build_keepalive(1)
        finally:
            sock.close()
            transport.close()

    asyncio.run(main())


def test_ip_discovery_ignores_junk_and_retries_after_silence():
    def script(n, data, addr):
        (ssrc,) = struct.unpack_from(">I", data, 4)
        if n == 1:
            return []  # the first request is lost
        # then: a keepalive echo, someone else's answer, and finally ours
        return [build_keepalive(0), response(ssrc + 1, b"10.0.0.1", 1), response(ssrc, b"192.0.2.1", 4242)]

    async def main():
        transport, responder, port = await start_responder(script)
        sock = open_voice_socket("127.0.0.1", port)
        try:
            found = await ip_discovery(asyncio.get_running_loop(), sock, 77, timeout=0.2, retries=3)
            assert found == ("192.0.2.1", 4242)
            assert len(responder.requests) == 2
        finally:
            sock.close()
            transport.close()

    asyncio.run(main())


def test_ip_discovery_times_out_after_the_last_try():
    async def main():
        transport, responder, port = await start_responder(lambda n, d, a: [])
        sock = open_voice_socket("127.0.0.1", port)
        try:
            with pytest.raises(ConnectTimeout, match="3 tries"):
                await ip_discovery(asyncio.get_running_loop(), sock, 5, timeout=0.05, retries=3)
            assert len(responder.requests) == 3
        finally:
            sock.close()
            transport.close()

    asyncio.run(main())


def test_ip_discovery_to_a_closed_port_is_a_timeout_not_a_crash():
    async def main():
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nobody listens there now: the kernel answers with ICMP port unreachable
        sock = open_voice_socket("127.0.0.1", port)
        try:
            with pytest.raises(ConnectTimeout):
                await ip_discovery(asyncio.get_running_loop(), sock, 5, timeout=0.05, retries=2)
        finally:
            sock.close()

    asyncio.run(main())
