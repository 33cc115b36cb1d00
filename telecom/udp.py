"""The voice UDP socket: opening it, IP discovery (spec §2.1) and the keepalive packet (§2.2).

This module owns the socket's setup and the two small non-RTP packets a client sends on it. It does
not send or receive RTP: once discovery is done the socket's fd belongs to the native media engine,
which ``send()``s on it (the socket is ``connect()``ed to the voice server for that reason).
Discovery therefore works on the raw socket with ``loop.sock_*`` rather than a datagram transport,
which would take the fd over.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

from telecom.errors import ConnectTimeout, PacketError

__all__ = [
    "DISCOVERY_PACKET_SIZE",
    "build_discovery_request",
    "build_keepalive",
    "ip_discovery",
    "open_voice_socket",
    "parse_discovery_response",
    "send_keepalives",
]

log = logging.getLogger("telecom.udp")

#: Both the request and the response are 74 bytes; servers ignore the old 70-byte request (spec §2.1).
DISCOVERY_PACKET_SIZE = 74
_DISCOVERY_REQUEST = 0x0001
_DISCOVERY_RESPONSE = 0x0002
_DISCOVERY_LENGTH = 70  # the length field excludes the 2-byte type and itself
_HEADER = struct.Struct(">HHI")  # type, length, ssrc
_PORT = struct.Struct(">H")

# Kernel buffers: a receive-heavy connection (many speakers, a late media thread) should not lose
# packets in the socket. 256 KiB holds ~1.5 s of 50 speakers' audio; the kernel caps at rmem_max.
SOCKET_BUFFER_BYTES = 256 * 1024


def open_voice_socket(remote_ip: str, remote_port: int) -> socket.socket:
    """A non-blocking UDP socket ``connect()``ed to the voice server at ``remote_ip:remote_port``.

    ``remote_ip`` is Ready's ``ip`` (an address literal, IPv4 or IPv6). Connecting lets the engine
    use plain ``send()`` and makes the kernel drop datagrams from anyone else.
    """
    if not 0 < int(remote_port) < 65536:
        raise PacketError(f"voice server port out of range: {remote_port!r}")
    try:
        infos = socket.getaddrinfo(
            remote_ip, int(remote_port), type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        # Not an address literal: Discord sends literals, but a test server may hand out a name.
        infos = socket.getaddrinfo(remote_ip, int(remote_port), type=socket.SOCK_DGRAM)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:  # pragma: no cover - some sandboxes refuse; the default still works
                log.debug("could not raise socket buffer option %s", option)
        sock.setblocking(False)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def build_discovery_request(ssrc: int) -> bytes:
    """The 74-byte IP discovery request: type 1, length 70, our SSRC, then 66 zero bytes."""
    if not 0 <= ssrc <= 0xFFFFFFFF:
        raise ValueError(f"ssrc must be a uint32, got {ssrc!r}")
    # Zero-filled on purpose: some newer servers reject a request with garbage in the address field.
    return _HEADER.pack(_DISCOVERY_REQUEST, _DISCOVERY_LENGTH, ssrc) + bytes(DISCOVERY_PACKET_SIZE - 8)


def parse_discovery_response(data: bytes, ssrc: int) -> tuple[str, int]:
    """``(external_ip, external_port)`` from an IP discovery response meant for ``ssrc``.

    Raises :class:`~telecom.errors.PacketError` if ``data`` is short, is not a type-2 length-70
    response, names another SSRC, or carries no valid address or port.
    """
    if len(data) < DISCOVERY_PACKET_SIZE:
        raise PacketError(
            f"IP discovery response too short: {len(data)} bytes, expected {DISCOVERY_PACKET_SIZE}"
        )
    type_, length, their_ssrc = _HEADER.unpack_from(data, 0)
    if type_ != _DISCOVERY_RESPONSE:
        raise PacketError(f"not an IP discovery response: type {type_:#06x}")
    if length != _DISCOVERY_LENGTH:
        raise PacketError(f"IP discovery response has length field {length}, expected {_DISCOVERY_LENGTH}")
    if their_ssrc != ssrc:
        raise PacketError(f"IP discovery response for ssrc {their_ssrc}, ours is {ssrc}")
    raw_address = bytes(data[8:72]).split(b"\x00", 1)[0]
    try:
        address = str(ipaddress.ip_address(raw_address.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise PacketError(f"IP discovery response carries no valid address: {raw_address[:64]!r}") from None
    (port,) = _PORT.unpack_from(data, 72)
    if port == 0:
        raise PacketError("IP discovery response carries port 0")
    return address, port


def build_keepalive(counter: int) -> bytes:
    """The 8-byte UDP keepalive: the counter as a little-endian uint32, then four zero bytes."""
    return struct.pack("<I", counter & 0xFFFFFFFF) + bytes(4)


async def ip_discovery(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ssrc: int,
    *,
    timeout: float = 2.0,
    retries: int = 3,
) -> tuple[str, int]:
    """Ask the voice server which address and port it sees us at; ``(external_ip, external_port)``.

    Sends the request up to ``retries`` times (at least once), waiting ``timeout`` seconds for a
    matching response after each send; anything else arriving meanwhile is ignored. Raises
    :class:`~telecom.errors.ConnectTimeout` when no try got an answer.
    """
    request = build_discovery_request(ssrc)
    tries = max(1, int(retries))
    last_problem = "no response"
    for attempt in range(1, tries + 1):
        try:
            await loop.sock_sendall(sock, request)
        except OSError as exc:  # e.g. ICMP port unreachable reported on a connected socket
            last_problem = f"send failed: {exc}"
            log.debug("IP discovery try %d/%d: %s", attempt, tries, last_problem)
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), remaining)
            except asyncio.TimeoutError:
                break
            except ConnectionRefusedError as exc:
                # Nobody listens at Ready's ip:port (yet); the kernel reports the ICMP error on the
                # next recv. Wait out this try rather than spinning on it.
                last_problem = f"connection refused: {exc}"
                await asyncio.sleep(min(remaining, 0.05))
                continue
            try:
                return parse_discovery_response(data, ssrc)
            except PacketError as exc:
                last_problem = f"ignored a {len(data)}-byte packet: {exc}"
                log.debug("IP discovery: %s", last_problem)
        log.debug("IP discovery try %d/%d for ssrc %d got no answer", attempt, tries, ssrc)
    raise ConnectTimeout(
        f"IP discovery got no answer after {tries} tries of {timeout:g} s ({last_problem})"
    )


async def send_keepalives(sock: socket.socket, interval: float = 5.0) -> None:
    """Send an 8-byte keepalive every ``interval`` seconds until cancelled.

    Keeps a NAT binding open while nothing else is sent. Replies are not awaited or required:
    some voice servers never echo them (spec §2.2). Send errors are logged and ignored.
    """
    counter = 0
    while True:
        await asyncio.sleep(interval)
        try:
            sock.send(build_keepalive(counter))
        except (BlockingIOError, InterruptedError):
            pass  # a full send buffer: the engine is busy sending, which keeps the binding open anyway
        except OSError as exc:
            if sock.fileno() < 0:
                return
            log.debug("UDP keepalive %d not sent: %s", counter, exc)
        counter = (counter + 1) & 0xFFFFFFFF
