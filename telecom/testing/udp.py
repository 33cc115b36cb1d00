"""The UDP side of the local voice server: IP discovery, receive + validate, and the SFU relay.

Owns the one datagram socket (spec §2): answers 74-byte IP discovery requests for known SSRCs
(70-byte ones are ignored, as Discord does), counts keepalives and RTCP, opens each member's RTP
with their key and mode (:mod:`telecom.testing.transport`), records and validates it
(:mod:`telecom.testing.records`), and relays it to every other member of the channel that has a
UDP address, re-sealed with the receiver's key and nonce counter, the sender's SSRC/sequence/
timestamp kept, and an encrypted one-byte-header extension as Discord's SFU adds. Relay faults
(loss, loss bursts, reorder, duplication, jitter; per receiver with ``Faults.relay_to``) are applied
here. Runs on the server loop; takes the server's lock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from telecom.errors import DecryptError, PacketError
from telecom.testing.records import ReceivedPacket
from telecom.testing.transport import OPUS_PAYLOAD_TYPE, SILENCE_FRAME, is_rtcp, relay_packet

if TYPE_CHECKING:  # pragma: no cover
    from telecom.testing.server import LocalVoiceServer
    from telecom.testing.session import VoiceSession

log = logging.getLogger("telecom.testing.udp")

DISCOVERY_SIZE = 74
DISCOVERY_REQUEST = 1
DISCOVERY_RESPONSE = 2
#: How long a packet held back by the reorder fault waits for a successor before going out anyway.
REORDER_HOLD_SECONDS = 0.1


class VoiceUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: LocalVoiceServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self._burst_left: dict[int, int] = {}  # receiver user id -> packets still to lose in a burst

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: not the server's problem.
        log.debug("udp error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int], arrival: float | None = None) -> None:
        # ``arrival``: the kernel's receive time on the monotonic clock (KernelStampedUdp); the
        # validation's timing rules must not see this Python server's own scheduling delays.
        if arrival is None:
            arrival = time.monotonic()
        server = self.server
        with server._lock:
            if server.faults.udp_blackhole and self._blackholed(addr):
                server._counters["blackholed_in"] += 1
                return
            try:
                self._classify(data, addr, arrival)
            except Exception:  # never let one bad datagram stop the server
                log.exception("local voice server: error handling a datagram from %s", addr)

    def _classify(self, data: bytes, addr: tuple[str, int], arrival: float) -> None:
        server = self.server
        counters = server._counters
        size = len(data)
        if size == DISCOVERY_SIZE and struct.unpack_from(">HH", data) == (DISCOVERY_REQUEST, 70):
            self._discovery(data, addr, arrival)
        elif size == 70:
            counters["discovery_70_ignored"] += 1  # the pre-2023 form gets no answer
        elif size == 8:
            counters["keepalives"] += 1
        elif size >= 12 and data[0] >> 6 == 2:
            if is_rtcp(data):
                counters["rtcp_in"] += 1
                (ssrc,) = struct.unpack_from(">I", data, 4)
                session = server._by_ssrc.get(ssrc)
                if session is not None:
                    server._record_for(session).rtcp_packets += 1
            else:
                self._rtp(data, addr, arrival)
        else:
            counters["ignored"] += 1

    def _discovery(self, data: bytes, addr: tuple[str, int], arrival: float) -> None:
        server = self.server
        (ssrc,) = struct.unpack_from(">I", data, 4)
        session = server._by_ssrc.get(ssrc)
        if session is None:
            detail = f"IP discovery for unknown SSRC {ssrc}"
            server._violation("unknown_ssrc", None, detail, arrival, ssrc=ssrc)
            return
        session.udp_address = addr
        server._counters["discovery"] += 1
        ip = addr[0].encode("ascii")[:63]
        response = struct.pack(">HHI64sH", DISCOVERY_RESPONSE, 70, ssrc, ip, addr[1])
        assert self.transport is not None
        self.transport.sendto(response, addr)

    def _rtp(self, data: bytes, addr: tuple[str, int], arrival: float) -> None:
        server = self.server
        server._counters["rtp_in"] += 1
        (ssrc,) = struct.unpack_from(">I", data, 8)
        session = server._by_ssrc.get(ssrc)
        if session is None:
            server._violation("unknown_ssrc", None, f"RTP from unknown SSRC {ssrc}", arrival, ssrc=ssrc)
            return
        if session.cipher is None:
            server._violation(
                "unknown_ssrc", session, "RTP before Session Description (no key yet)", arrival
            )
            return
        try:
            header, counter, payload = session.cipher.open(data)
        except DecryptError as exc:
            server._violation("decrypt_failed", session, str(exc), arrival)
            return
        except PacketError as exc:
            server._violation("malformed_packet", session, str(exc), arrival)
            return
        # Symmetric RTP: once a packet authenticates, its source is where the member lives.
        session.udp_address = addr
        packet = ReceivedPacket(
            arrival=arrival,
            sequence=header.sequence,
            timestamp=header.timestamp,
            ssrc=ssrc,
            marker=header.marker,
            payload_type=header.payload_type,
            counter=counter,
            payload=payload,
            size=len(data),
        )
        record = server._record_for(session)
        record.packets.append(packet)
        if packet.is_silence:
            record.silence_frames += 1
        validator = session.validator
        had_pending = validator.pending_audio_before_speaking is not None
        for kind, detail in validator.check(packet, record):
            server._violation(kind, session, detail, arrival)
        if server.speaking_required and not had_pending and validator.pending_audio_before_speaking:
            server._schedule_speaking_check(session)
        if header.payload_type != OPUS_PAYLOAD_TYPE:
            return  # Discord's SFU does not forward what it cannot classify as audio
        self._relay(session, packet)
        record.relay_times.append((len(record.packets) - 1, time.monotonic()))

    # -- SFU ------------------------------------------------------------------------------------

    def _relay(self, sender: VoiceSession, packet: ReceivedPacket) -> None:
        server = self.server
        faults = server.faults
        for receiver in server._media_members(sender.channel_id):
            if receiver is sender or receiver.cipher is None or receiver.udp_address is None:
                continue
            counter = receiver.relay_counter
            receiver.relay_counter = (counter + 1) & 0xFFFFFFFF
            wire = relay_packet(
                receiver.cipher,
                counter,
                marker=packet.marker,
                payload_type=packet.payload_type,
                sequence=packet.sequence,
                timestamp=packet.timestamp,
                ssrc=packet.ssrc,
                payload=packet.payload,
                audio_level=127 if packet.payload == SILENCE_FRAME else 30,
            )
            if not faults.applies_to(receiver.user_id):
                self._send(receiver, wire, faulty=False)
                continue
            burst_left = self._burst_left.get(receiver.user_id, 0)
            if burst_left == 0 and faults.chance(faults.relay_burst):
                burst_left = max(1, faults.relay_burst_length)
            if burst_left:
                self._burst_left[receiver.user_id] = burst_left - 1
                server._counters["relay_lost"] += 1
                server._counters["relay_burst_lost"] += 1
                continue
            if faults.chance(faults.relay_loss):
                server._counters["relay_lost"] += 1
                continue
            delay = faults.jitter_delay()
            if delay > 0.0:
                loop = asyncio.get_running_loop()
                loop.call_later(delay, self._send_later, receiver, wire)
                server._counters["relay_delayed"] += 1
                continue
            held = receiver.held.pop(packet.ssrc, None)
            if held is not None:
                held_wire, timer = held
                timer.cancel()
                self._send(receiver, wire)
                self._send(receiver, held_wire)
                server._counters["relay_reordered"] += 1
            elif faults.chance(faults.relay_reorder):
                loop = asyncio.get_running_loop()
                timer = loop.call_later(REORDER_HOLD_SECONDS, self._flush_held, receiver, packet.ssrc)
                receiver.held[packet.ssrc] = (wire, timer)
            else:
                self._send(receiver, wire)

    def _blackholed(self, addr: tuple[str, int]) -> bool:
        cut = self.server.faults.udp_blackhole
        return any(s.udp_address == addr and s.user_id in cut for s in self.server._by_ssrc.values())

    def _send(self, receiver: VoiceSession, wire: bytes, faulty: bool = True) -> None:
        if self.transport is None or receiver.udp_address is None:
            return
        if receiver.user_id in self.server.faults.udp_blackhole:
            self.server._counters["blackholed_out"] += 1
            return
        self.transport.sendto(wire, receiver.udp_address)
        self.server._counters["relayed"] += 1
        if faulty and self.server.faults.chance(self.server.faults.relay_duplicate):
            self.transport.sendto(wire, receiver.udp_address)
            self.server._counters["relay_duplicated"] += 1

    def _send_later(self, receiver: VoiceSession, wire: bytes) -> None:
        with self.server._lock:
            if not receiver.ended:
                self._send(receiver, wire)

    def _flush_held(self, receiver: VoiceSession, ssrc: int) -> None:
        with self.server._lock:
            held = receiver.held.pop(ssrc, None)
            if held is not None:
                self._send(receiver, held[0])


# Linux: SO_TIMESTAMPNS delivers the kernel receive time (CLOCK_REALTIME, struct timespec) as
# SCM_TIMESTAMPNS ancillary data. Python's socket module does not name the constant.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


class KernelStampedUdp:
    """The server's datagram endpoint: reads with ``recvmsg`` to learn when the kernel received each
    datagram, so arrival times (and every timing rule checked on them) stay right even when this
    Python server is descheduled for a while on a busy machine and then reads a backlog at once.

    The part of ``asyncio.DatagramTransport`` the server uses: ``sendto``, ``get_extra_info``, ``close``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: VoiceUdpProtocol) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._stamped = True
        except OSError:  # not Linux: fall back to reading time
            self._stamped = False
        self._ancsize = socket.CMSG_SPACE(_TIMESPEC.size) if self._stamped else 0
        self.send_dropped = 0
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        for _ in range(512):  # bounded, so a flood cannot starve the websockets on this loop
            try:
                data, ancdata, _flags, addr = self._sock.recvmsg(65536, self._ancsize)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                continue
            arrival = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(payload)
                    arrival = time.monotonic() - (time.time() - (sec + nsec * 1e-9))
            self._protocol.datagram_received(data, addr, arrival)

    def sendto(self, data: bytes, addr: Any) -> None:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += 1  # UDP: a full send buffer loses the datagram, as the network would
        except OSError as exc:
            self._protocol.error_received(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
