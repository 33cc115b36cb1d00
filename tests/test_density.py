"""Opus passthrough input, the scheduler with many connections, and the frame-encryptor (DAVE) hook,
checked at the local voice server: what arrived on the wire (payloads byte for byte, sequence and
timestamp continuity), decoded with the server's own opuslib decoder where levels matter."""

from __future__ import annotations

import contextlib
import struct
import threading
import time

import opuslib
import pytest

from audio_checks import active_part, left_channel, peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from telecom import BufferFull, Client, CodecError, ConfigurationError, OpusPipe, Playable, TelecomError
from telecom.engine import get_engine

SILENCE = b"\xf8\xff\xfe"


@pytest.fixture(scope="module")
def voice_server():
    """A local voice server whose UDP socket can absorb one tick of 200 connections at once.

    The default receive buffer (~208 KiB) holds ~200 small datagrams: a burst from 200 connections
    in the same tick would overflow it whenever the server's thread is a little late, and the kernel
    would drop packets the test then counts as lost.
    """
    import socket

    from telecom.testing import LocalVoiceServer

    server = LocalVoiceServer(dave=False, heartbeat_interval=1.0, session_timeout=10.0)
    server.start_background()
    sock = server._udp.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    yield server
    server.stop_background()


def join(server) -> tuple[Client, int]:
    guild, channel, user = new_ids()
    creds = server.create_session(guild, channel, user)
    client = Client(user, guild, creds.session_id, channel_id=channel)
    client.set_server_info(server.url, creds.token)
    return client, user


def join_many(server, n: int) -> list[tuple[Client, int]]:
    clients = [join(server) for _ in range(n)]
    for client, _ in clients:
        client.wait_ready(20)
    return clients


def opus_tone(seconds: float, freq: float, dbfs: float = -6.0) -> list[bytes]:
    """A tone encoded by opuslib (not telecom's encoder): 20 ms packets at 64 kbit/s."""
    enc = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    enc.bitrate = 64000
    pcm = stereo_tone(seconds, freq, dbfs)
    return [enc.encode(pcm[i : i + 3840], 960) for i in range(0, len(pcm) - 3839, 3840)]


def marked_packets(stream: int, count: int) -> list[bytes]:
    """Distinct, valid 20 ms Opus packets (CELT fullband stereo TOC, code 0) naming stream and index:
    a packet sent on the wrong connection or out of order cannot go unnoticed."""
    return [b"\xfc" + struct.pack(">HH", stream, i) + bytes((stream + i + k) & 0xFF for k in range(40))
            for i in range(count)]


def play_to_the_end(clients, pipes, timeout: float) -> None:
    """Each client plays its pipe (all started first), and every pipe ends normally."""
    for (client, _), pipe in zip(clients, pipes):
        client.play(pipe)
    for pipe in pipes:
        assert pipe.done.result(timeout) == "ended"


def wait_quiet(server, user, timeout=10.0):
    server.wait_for_sync(lambda: (ev := server.record(user).speaking_events) and ev[-1][1] == 0, timeout)


def assert_contiguous(packets) -> None:
    seqs = [p.sequence for p in packets]
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), "sequence must stay contiguous"
    stamps = [p.timestamp for p in packets]
    assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:])), "timestamps must step by 960"


def audio_payloads(server, user) -> list[bytes]:
    return [p.payload for p in server.record(user).packets if p.payload != SILENCE]


# -- the Opus pipe --------------------------------------------------------------------------------

def test_opus_pipe_packets_arrive_byte_identical(voice_server):
    client, user = join_many(voice_server, 1)[0]
    packets = opus_tone(1.0, 440.0)
    pipe = Playable.from_opus_pipe()
    assert isinstance(pipe, OpusPipe)
    for packet in packets:
        pipe.send(packet)
    pipe.close()
    client.play(pipe)
    assert pipe.done.result(6) == "ended"
    wait_quiet(voice_server, user)
    record = voice_server.record(user)
    assert audio_payloads(voice_server, user) == packets
    assert [p.payload for p in record.packets[-5:]] == [SILENCE] * 5
    assert_contiguous(record.packets)
    assert voice_server.violations(user) == []
    stats = client.stats()
    assert stats["frames_sent"] == len(packets) and stats["passthrough_frames"] == len(packets)
    assert pipe.stats()["passthrough_frames"] == len(packets) and pipe.stats()["decoded_frames"] == 0
    # and it is the tone (decoded by the server's opuslib)
    audio = active_part(left_channel(record.pcm()))
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    client.close()


def test_opus_pipe_validates_packets_and_is_all_or_nothing():
    pipe = Playable.from_opus_pipe(buffer_seconds=0.1)
    assert pipe.capacity == 5
    enc = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    pcm10 = bytes(480 * 4)
    with pytest.raises(CodecError, match="20 ms"):
        pipe.send(enc.encode(pcm10, 480))                    # a 10 ms packet
    with pytest.raises(CodecError, match="1..1275"):
        pipe.send(b"")
    with pytest.raises(CodecError, match="1..1275"):
        pipe.send(b"\xfc" + bytes(1275))
    with pytest.raises(CodecError):
        pipe.send("not bytes")                                 # type: ignore[arg-type]
    good = marked_packets(1, 6)
    for packet in good[:5]:
        pipe.send(packet)
    with pytest.raises(BufferFull):
        pipe.send(good[5])
    assert pipe.buffered == 5
    # a batch with a bad packet queues nothing
    pipe.stop()
    other = Playable.from_opus_pipe(buffer_seconds=0.1)
    with pytest.raises(CodecError):
        other.send_many([good[0], b"\xfc" + bytes(1300)])
    assert other.buffered == 0
    assert other.send_many(good) == 5 and other.buffered == 5
    other.close()
    with pytest.raises(TelecomError):
        get_engine().new_opus_source(4).write(b"\x00" * 3840)
    with pytest.raises(ConfigurationError):
        Playable.from_opus_pipe(buffer_seconds=0)


def test_volume_change_mid_stream_reencodes_then_passes_through_again(voice_server):
    client, user = join_many(voice_server, 1)[0]
    packets = opus_tone(3.0, 440.0)
    pipe = Playable.from_opus_pipe()
    pipe.send_many(packets)
    pipe.close()
    client.play(pipe)
    voice_server.wait_for_sync(lambda: len(voice_server.record(user).packets) >= 50, 5)
    client.set_volume(50)
    voice_server.wait_for_sync(lambda: len(voice_server.record(user).packets) >= 100, 5)
    client.set_volume(100)
    pipe.done.result(6)
    wait_quiet(voice_server, user)
    record = voice_server.record(user)
    got = audio_payloads(voice_server, user)
    assert len(got) == len(packets), "no frame lost when switching"
    assert_contiguous(record.packets)
    assert voice_server.violations(user) == []
    same = [a == b for a, b in zip(got, packets)]
    # passthrough, then re-encoded (payloads differ), then passthrough again
    first_diff = same.index(False)
    last_diff = len(same) - 1 - same[::-1].index(False)
    assert 40 <= first_diff <= 60 and 90 <= last_diff <= 115
    assert all(same[:first_diff]) and all(same[last_diff + 1 :])
    assert sum(same[first_diff : last_diff + 1]) == 0
    stats = pipe.stats()
    assert stats["passthrough_frames"] + stats["decoded_frames"] == len(packets)
    assert stats["decoded_frames"] == last_diff - first_diff + 1
    # decoded level of the re-encoded part is 6 dB under the passthrough part
    pcm = left_channel(record.pcm())
    loud = pcm[: (first_diff - 5) * 960][48000 // 5 :]
    quiet = pcm[(first_diff + 5) * 960 : (last_diff - 5) * 960]
    assert rms_db(quiet) - rms_db(loud) == pytest.approx(-6.02, abs=0.5)
    assert peak_frequency(quiet) == pytest.approx(440.0, abs=2.0)
    client.close()


def test_from_opus_packets_respects_backpressure(voice_server):
    client, user = join_many(voice_server, 1)[0]
    packets = marked_packets(7, 100)
    ahead = []
    holder: dict = {}

    def source():
        for i, packet in enumerate(packets):
            pipe = holder.get("pipe")
            if pipe is not None:
                ahead.append(i - pipe.frames_played)
            yield packet

    pipe = Playable.from_opus_packets(source(), buffer_seconds=0.2)
    holder["pipe"] = pipe
    client.play(pipe)
    assert pipe.done.result(8) == "ended"
    wait_quiet(voice_server, user)
    assert audio_payloads(voice_server, user) == packets
    # the feeder never ran more than the 10-packet buffer (+ the one it holds) ahead of the wire
    assert max(ahead) <= pipe.capacity + 2
    assert_contiguous(voice_server.record(user).packets)
    client.close()


def test_from_opus_packets_failing_iterable_stops_with_the_error(voice_server):
    client, user = join_many(voice_server, 1)[0]
    packets = marked_packets(8, 10)

    def source():
        yield from packets
        raise RuntimeError("the file went away")

    pipe = Playable.from_opus_packets(source())
    client.play(pipe)
    try:
        pipe.done.result(5)
    except RuntimeError:
        pass
    assert isinstance(pipe.error, RuntimeError)
    wait_quiet(voice_server, user)
    # what came before the failure was played out, in order; then the pipe ended
    assert audio_payloads(voice_server, user) == packets
    assert pipe.state == "ended"
    client.close()


# -- the scheduler with many connections ------------------------------------------------------------

def test_200_passthrough_connections_arrive_complete_and_in_order(voice_server):
    clients = join_many(voice_server, 200)
    sent = {}
    pipes = []
    for k, (client, user) in enumerate(clients):
        sent[user] = marked_packets(k, 100)          # 2 s each
        pipe = Playable.from_opus_pipe(buffer_seconds=3)
        pipe.send_many(sent[user])
        pipe.close()
        pipes.append(pipe)
    play_to_the_end(clients, pipes, 20)
    for client, user in clients:
        wait_quiet(voice_server, user)
        # Speaking 0 comes over the websocket and may overtake the last datagrams still queued at
        # the (Python) server's UDP socket when 10,000 packets/s arrive: wait for them too.
        voice_server.wait_for_sync(lambda: len(audio_payloads(voice_server, user)) >= len(sent[user]), 10)
        assert audio_payloads(voice_server, user) == sent[user], user
        assert_contiguous(voice_server.record(user).packets)
        assert voice_server.violations(user) == []
        stats = client.stats()
        assert stats["passthrough_frames"] == 100 and stats["underruns"] == 0 and stats["skipped"] == 0
    threads = get_engine().stats()["threads"]
    assert sum(t["connections"] for t in threads) >= 200
    for client, _ in clients:
        client.close()


def test_adding_and_removing_connections_mid_run_loses_nothing_on_the_others(voice_server):
    steady = join_many(voice_server, 30)
    sent = {}
    pipes = []
    for k, (client, user) in enumerate(steady):
        sent[user] = marked_packets(1000 + k, 150)   # 3 s
        pipe = Playable.from_opus_pipe()
        pipe.send_many(sent[user])
        pipe.close()
        client.play(pipe)
        pipes.append(pipe)
    time.sleep(0.4)
    # 20 more join and play while the others run; then half of them leave mid-stream
    extra = join_many(voice_server, 20)
    for k, (client, user) in enumerate(extra):
        pipe = Playable.from_opus_pipe()
        pipe.send_many(marked_packets(2000 + k, 100))
        client.play(pipe)
    time.sleep(0.5)
    for client, _ in extra[:10]:
        client.close()
    time.sleep(0.2)
    for client, _ in extra[10:]:
        client.close()
    for pipe in pipes:
        assert pipe.done.result(10) == "ended"
    for client, user in steady:
        wait_quiet(voice_server, user)
        assert audio_payloads(voice_server, user) == sent[user], user
        assert_contiguous(voice_server.record(user).packets)
        assert voice_server.violations(user) == []
        assert client.stats()["underruns"] == 0
        client.close()


def test_a_stalled_source_underruns_with_silence_and_does_not_stall_the_others(voice_server):
    (stalled, user_s), (steady, user_ok) = join_many(voice_server, 2)
    stalled_pipe = Playable.from_opus_pipe()
    first = marked_packets(3000, 10)
    stalled_pipe.send_many(first)                      # 200 ms, then nothing (not closed)
    stalled.play(stalled_pipe)
    steady_pipe = Playable.from_opus_pipe()
    steady_packets = marked_packets(3001, 100)
    steady_pipe.send_many(steady_packets)
    steady_pipe.close()
    steady.play(steady_pipe)
    assert steady_pipe.done.result(6) == "ended"
    wait_quiet(voice_server, user_ok)
    wait_quiet(voice_server, user_s)
    assert audio_payloads(voice_server, user_ok) == steady_packets
    record = voice_server.record(user_s)
    assert [p.payload for p in record.packets] == first + [SILENCE] * 5
    assert stalled.stats()["underruns"] >= 5 and stalled_pipe.underruns >= 5
    assert stalled_pipe.state == "playing"
    # data again: a new talk spurt, sequence still contiguous, nothing lost
    more = marked_packets(3002, 10)
    stalled_pipe.send_many(more)
    stalled_pipe.close()
    assert stalled_pipe.done.result(5) == "ended"
    wait_quiet(voice_server, user_s)
    assert audio_payloads(voice_server, user_s) == first + more
    packets = voice_server.record(user_s).packets
    assert all((b.sequence - a.sequence) % 65536 == 1 for a, b in zip(packets, packets[1:]))
    assert voice_server.violations(user_s) == []
    stalled.close()
    steady.close()


# -- the frame-encryptor hook -------------------------------------------------------------------------

TRAILER = b"\xda\x7e"


def add_trailer(payload: bytes) -> bytes:
    """A reversible stand-in for DAVE: payload + its length + a marker."""
    return payload + struct.pack(">H", len(payload)) + TRAILER


def strip_trailer(payload: bytes) -> bytes:
    assert payload.endswith(TRAILER), payload[-8:]
    (n,) = struct.unpack(">H", payload[-4:-2])
    assert n == len(payload) - 4
    return payload[:n]


def test_frame_encryptor_transforms_audio_frames_not_silence(voice_server):
    (c_opus, u_opus), (c_pcm, u_pcm) = join_many(voice_server, 2)
    c_opus._conn.set_frame_encryptor(add_trailer)
    c_pcm._conn.set_frame_encryptor(add_trailer)
    packets = marked_packets(4000, 50)
    opus_pipe = Playable.from_opus_pipe()
    opus_pipe.send_many(packets)
    opus_pipe.close()
    c_opus.play(opus_pipe)
    pcm_pipe = Playable.from_pcm_pipe()
    pcm_pipe.send(stereo_tone(1.0, 440.0))
    pcm_pipe.close()
    c_pcm.play(pcm_pipe)
    opus_pipe.done.result(5)
    pcm_pipe.done.result(5)
    wait_quiet(voice_server, u_opus)
    wait_quiet(voice_server, u_pcm)
    rec = voice_server.record(u_opus)
    assert [p.payload for p in rec.packets] == [add_trailer(p) for p in packets] + [SILENCE] * 5
    assert_contiguous(rec.packets)
    rec = voice_server.record(u_pcm)
    assert [p.payload for p in rec.packets[-5:]] == [SILENCE] * 5       # silence passes unencrypted
    assert all(p.payload.endswith(TRAILER) for p in rec.packets[:-5]) and len(rec.packets) == 55
    audio = active_part(left_channel(rec.pcm(decrypt=strip_trailer)))
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-6.0 - 3.01, abs=1.0)
    assert voice_server.violations(u_pcm) == [] and voice_server.violations(u_opus) == []
    c_opus.close()
    c_pcm.close()


def test_frame_encryptor_failure_drops_the_frame_counts_it_and_raises_an_error_event(voice_server):
    client, user = join_many(voice_server, 1)[0]
    errors = []
    client.on("error", lambda event: errors.append(event))
    calls = []

    def flaky(payload: bytes) -> bytes:
        calls.append(payload)
        if len(calls) % 10 == 5:
            raise RuntimeError("no key for this epoch")
        return add_trailer(payload)

    client._conn.set_frame_encryptor(flaky)
    packets = marked_packets(5000, 50)
    pipe = Playable.from_opus_pipe()
    pipe.send_many(packets)
    pipe.close()
    client.play(pipe)
    pipe.done.result(5)
    wait_quiet(voice_server, user)
    dropped = [packets[i] for i in range(50) if i % 10 == 4]
    got = [strip_trailer(p) for p in audio_payloads(voice_server, user)]
    assert got == [p for p in packets if p not in dropped]
    stats = client.stats()
    assert stats["encryptor_errors"] == 5 and stats["frames_sent"] == 45
    # sequence numbers stay contiguous: a dropped frame never consumed one
    seqs = [p.sequence for p in voice_server.record(user).packets]
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:]))
    deadline = time.monotonic() + 2
    while len(errors) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(errors) == 5 and "frame encryptor" in str(errors[0].data["error"])
    client._conn.set_frame_encryptor(None)
    client.close()


def test_frame_encryptor_takes_the_gil_once_per_batch_not_per_frame(voice_server):
    n = 40
    clients = join_many(voice_server, n)
    frames = []
    lock = threading.Lock()

    def counting(payload: bytes) -> bytes:
        with lock:
            frames.append(len(payload))
        return payload

    engine = get_engine()
    holds_before = sum(t["encryptor_gil_holds"] for t in engine.stats()["threads"])
    pipes = []
    for k, (client, _) in enumerate(clients):
        client._conn.set_frame_encryptor(counting)
        pipe = Playable.from_opus_pipe()
        pipe.send_many(marked_packets(6000 + k, 50))
        pipe.close()
        pipes.append(pipe)
    for (client, _), pipe in zip(clients, pipes):
        client.play(pipe)
    for pipe in pipes:
        pipe.done.result(6)
    holds = sum(t["encryptor_gil_holds"] for t in engine.stats()["threads"]) - holds_before
    assert len(frames) == n * 50
    # One hold per media thread per send phase that has encrypted frames (at most threads x 8 per
    # tick, however many connections), never one per frame.
    threads = len(engine.stats()["threads"])
    assert holds * 2 <= len(frames), (holds, len(frames))
    assert holds <= 60 * threads * 8, holds  # ~55 ticks of audio + tail
    for client, user in clients:
        wait_quiet(voice_server, user)
        client.close()


def test_new_connections_go_to_the_least_loaded_media_thread():
    """Placement by measured cost: idle connections spread evenly, then a thread that got expensive
    (encoding) receives no new connections until the other one carries as much."""
    import os
    import socket

    from telecom._fast import load

    native = load("engine")
    engine = native.MediaEngine(2)                # not started: ticks run synchronously below
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    socks, conns = [], []

    def new_conn(i):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(rx.getsockname())
        c = native.NativeConnection(engine, i)
        c.configure(s.fileno(), 100 + i, "aead_aes256_gcm_rtpsize", os.urandom(32))
        socks.append(s)
        conns.append(c)
        return c

    try:
        first = [new_conn(i).thread_index for i in range(4)]
        assert sorted(first) == [0, 0, 1, 1]
        # make thread 0 busy: its connections encode PCM for a few ticks
        busy = [c for c in conns if c.thread_index == 0]
        sources = []
        for k, c in enumerate(busy):
            src = native.PcmSource(1000 + k, 50 * 3840)
            src.write(stereo_tone(1.0, 440.0))
            c.attach(src)
            sources.append(src)
        tick = engine.current_tick() + 10
        engine.run_tick(0, tick)                  # asks for Speaking
        for c in busy:
            c.confirm_speaking()
        for t in range(tick + 10, tick + 30):
            engine.run_tick(0, t)
            engine.run_tick(1, t)
        loads = [t["load_us"] for t in engine.stats()["threads"]]
        assert loads[0] > 50 and loads[0] > 10 * loads[1], loads
        assert all(c.stats()["frames_sent"] >= 15 and c.stats()["cost_us"] > 20 for c in busy)
        later = [new_conn(10 + i).thread_index for i in range(5)]
        assert later == [1] * 5
    finally:
        for c in conns:
            c.close()
        engine.run_tick(0)
        engine.run_tick(1)
        for s in socks:
            s.close()
        rx.close()


def test_opus_pipe_pause_resume_stop_and_playable_volume(voice_server):
    """The same control as a PCM pipe: pause → silence tail and Speaking 0, resume → the rest of the
    packets unchanged; a playable volume of 50 % re-encodes; stop → done resolves (reason "stopped")."""
    (client, user), (other, user2) = join_many(voice_server, 2)
    packets = marked_packets(7000, 100)
    pipe = Playable.from_opus_pipe()
    pipe.send_many(packets)
    pipe.close()
    client.play(pipe)
    voice_server.wait_for_sync(lambda: len(audio_payloads(voice_server, user)) >= 30, 5)
    pipe.pause()
    voice_server.wait_for_sync(lambda: voice_server.record(user).speaking_events[-1][1] == 0, 3)
    time.sleep(0.2)
    pipe.resume()
    assert pipe.done.result(6) == "ended"
    wait_quiet(voice_server, user)
    assert audio_payloads(voice_server, user) == packets            # nothing lost, all passed through
    assert pipe.stats()["passthrough_frames"] == 100
    assert [flags for _, flags in voice_server.record(user).speaking_events] == [1, 0, 1, 0]
    assert voice_server.violations(user) == []

    tone = opus_tone(2.0, 440.0)
    pipe2 = Playable.from_opus_pipe()
    pipe2.send_many(tone)
    pipe2.set_volume(50)
    other.play(pipe2)
    voice_server.wait_for_sync(lambda: len(audio_payloads(voice_server, user2)) >= 60, 5)
    pipe2.stop()
    assert pipe2.done.result(5) == "ended" and pipe2.end_reason == "stopped"
    wait_quiet(voice_server, user2)
    got = audio_payloads(voice_server, user2)
    assert len(got) >= 60 and not any(a == b for a, b in zip(got, tone))   # every frame re-encoded
    level = rms_db(active_part(left_channel(voice_server.record(user2).pcm())))
    assert level == pytest.approx(-6.0 - 3.01 - 6.02, abs=1.0)
    client.close()
    other.close()


# -- work ahead ---------------------------------------------------------------------------------------

def test_encoded_frames_are_worked_ahead_and_arrive_whole_in_order_and_in_tune(voice_server):
    """With work ahead (the default), encoded connections whose sources hold the next frame have it
    encoded and sealed a tick early; what arrives is the same: every frame, contiguous seq/timestamps,
    the tone at its frequency and level (decoded by the server's opuslib)."""
    clients = join_many(voice_server, 8)
    engine = get_engine()
    assert engine.media.work_ahead
    ahead_before = sum(t["ahead_frames"] for t in engine.stats()["threads"])
    pipes = []
    for k, (client, _) in enumerate(clients):
        pipe = Playable.from_pcm_pipe(buffer_seconds=3)
        pipe.send(stereo_tone(2.0, 300.0 + 100 * k, -12.0))
        pipe.close()
        pipes.append(pipe)
    play_to_the_end(clients, pipes, 10)
    ahead = sum(t["ahead_frames"] for t in engine.stats()["threads"]) - ahead_before
    for k, (client, user) in enumerate(clients):
        wait_quiet(voice_server, user)
        record = voice_server.record(user)
        assert len(audio_payloads(voice_server, user)) == 100, user
        assert_contiguous(record.packets)
        assert voice_server.violations(user) == []
        pcm = active_part(left_channel(record.pcm()))
        assert peak_frequency(pcm) == pytest.approx(300.0 + 100 * k, abs=2.0)
        assert rms_db(pcm) == pytest.approx(-15.0, abs=1.0)    # -12 dBFS peak sine: -15 dB RMS
        assert client.stats()["underruns"] == 0
    # Most frames were encoded a tick early (the first of each stream cannot be: it waits for
    # Speaking; a busy CI machine may also leave a phase no spare time now and then).
    assert ahead >= 0.5 * 8 * 100, ahead
    for client, _ in clients:
        client.close()


def start_sending(conn, rx, ssrc: int):
    """Configure ``conn`` on a new socket aimed at ``rx`` and confirm Speaking once the engine asks
    for it (its sources are attached already). Returns the socket, which the caller closes."""
    import os
    import socket

    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    conn.configure(tx.fileno(), ssrc, "aead_aes256_gcm_rtpsize", os.urandom(32))
    deadline = time.monotonic() + 5
    while conn.speaking != "requested" and time.monotonic() < deadline:
        time.sleep(0.002)
    conn.confirm_speaking()
    return tx


def drain(rx, quiet: float) -> list[bytes]:
    """Every datagram that arrives until ``rx`` has been quiet for ``quiet`` seconds."""
    got = []
    rx.settimeout(quiet)
    try:
        while True:
            got.append(rx.recv(2048))
    except OSError:
        pass
    return got


def test_work_ahead_covers_passthrough_and_can_be_turned_off():
    """Passthrough frames are worked ahead too, and arrive byte for byte in order; with
    ``work_ahead=False`` no frame is, and encoded audio still flows."""
    import socket

    from telecom._fast import load

    native = load("engine")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    packets = opus_tone(1.0, 440.0)
    for work_ahead, kind in [(True, "opus"), (False, "pcm"), (True, "pcm")]:
        engine = native.MediaEngine(1, 0, work_ahead)
        engine.start()
        conn = native.NativeConnection(engine, 1)
        if kind == "opus":
            src = native.OpusSource(1, 64 * 1277, 64)
            src.push_many(packets)
        else:
            src = native.PcmSource(1, 60 * 3840)
            src.write(stereo_tone(1.0, 440.0))
        conn.attach(src)
        tx = start_sending(conn, rx, 4242)
        rx.settimeout(5)
        got = [rx.recv(2048) for _ in range(50)]
        stats = engine.stats()["threads"][0]
        engine.stop()
        conn.close()
        tx.close()
        seqs = [struct.unpack(">H", p[2:4])[0] for p in got]
        assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), seqs
        if kind == "opus":   # rtpsize AES-GCM: the payload length is what was given, plus tag + nonce
            assert [len(p) - 12 - 16 - 4 for p in got] == [len(p) for p in packets]
        if work_ahead:
            assert stats["ahead_frames"] >= 25, stats
        else:
            assert stats["ahead_frames"] == 0, stats
        drain(rx, 0.05)                 # what is left, before the next round
    rx.close()


def test_a_frame_sealed_ahead_is_dropped_when_the_socket_goes_away():
    """unconfigure() (the socket is closing) while a frame waits sealed for its deadline: it is not
    sent to the dead descriptor (no send error, no error event)."""
    import socket

    from telecom._fast import load

    native = load("engine")
    engine = native.MediaEngine(1, 0, True)
    engine.start()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    conn = native.NativeConnection(engine, 1)
    src = native.PcmSource(1, 100 * 3840)
    src.write(stereo_tone(2.0, 440.0))
    conn.attach(src)
    try:
        for _ in range(5):
            tx = start_sending(conn, rx, 4242)
            for _ in range(5):
                rx.recv(2048)
            conn.unconfigure()
            time.sleep(0.06)
            tx.close()
        assert engine.stats()["threads"][0]["ahead_frames"] > 0
        assert conn.stats()["send_errors"] == 0
        assert not [e for e in engine.poll_events() if e[0] == 4], "EV_SEND_ERROR"
    finally:
        engine.stop()
        conn.close()
        rx.close()


def test_a_frame_sealed_ahead_is_not_sent_after_close():
    """close() while a frame waits sealed for its deadline: nothing leaves after close() returns
    (the caller closes the socket next, and its descriptor number may be reused at once)."""
    import socket

    from telecom._fast import load

    native = load("engine")
    engine = native.MediaEngine(1, 0, True)
    engine.start()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    late = []
    try:
        idle = []
        for k in range(5):
            # Seven idle connections first, so that this one sends in the tick's last phase (they are
            # given round-robin), 17.5 ms after the tick's start, where the thread frees closed ones.
            idle += [native.NativeConnection(engine, 1000 + 8 * k + i) for i in range(7)]
            conn = native.NativeConnection(engine, k + 1)
            src = native.PcmSource(k + 1, 100 * 3840)
            src.write(stereo_tone(2.0, 440.0))
            conn.attach(src)
            tx = start_sending(conn, rx, 4242 + k)
            rx.settimeout(5)
            for _ in range(6):
                rx.recv(2048)
            # Close 5 ms after a send: the next frame is sealed ahead, and the next tick has begun.
            time.sleep(0.005)
            conn.close()
            late += drain(rx, 0.08)
            tx.close()
        assert engine.stats()["threads"][0]["ahead_frames"] > 0
        assert late == [], f"{len(late)} packets left after close()"
        for c in idle:
            c.close()
    finally:
        engine.stop()
        rx.close()


def confirm_speaking_when_asked(conns) -> None:
    """Confirm Speaking for each of ``conns`` as soon as the (started) engine asks for it."""
    pending = list(conns)
    deadline = time.monotonic() + 5
    while pending and time.monotonic() < deadline:
        for c in [c for c in pending if c.speaking == "requested"]:
            c.confirm_speaking()
            pending.remove(c)
        time.sleep(0.002)
    assert not pending, "the engine never asked for Speaking"


def open_streams(got: list[bytes], keys: dict[int, bytes]) -> dict[int, list]:
    """What arrived, by SSRC, opened with `cryptography` (telecom.testing's cipher): one list of
    (header, counter, payload) per stream, in arrival order; every key's stream must be there."""
    from telecom.testing.transport import TransportCipher

    streams: dict[int, list] = {}
    for packet in got:
        streams.setdefault(struct.unpack(">I", packet[8:12])[0], []).append(packet)
    assert sorted(streams) == sorted(keys)
    return {ssrc: [TransportCipher("aead_aes256_gcm_rtpsize", keys[ssrc]).open(p) for p in packets]
            for ssrc, packets in streams.items()}


@contextlib.contextmanager
def two_media_threads(work_ahead: bool):
    """(native module, an unstarted 2-thread engine with rebalancing, a bound receiving socket, a list
    of things to close): all stopped and closed on the way out."""
    import socket

    from telecom._fast import load

    native = load("engine")
    engine = native.MediaEngine(2, 0, work_ahead, True)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    closers: list = []
    try:
        yield native, engine, rx, closers
    finally:
        engine.stop()
        for thing in closers:
            thing.close()
        rx.close()


def busy_on_thread_0(native, engine, rx, closers, nbusy: int, source, encryptor=None):
    """2 x ``nbusy`` connections placed while idle (so evenly over two media threads); those on thread 0
    get ``source(k)`` attached and a socket aimed at ``rx`` with a random key (SSRC 6000 + k). All go
    to ``closers``. Returns ({ssrc: connection}, {ssrc: key})."""
    import os
    import socket

    conns = [native.NativeConnection(engine, i + 1) for i in range(2 * nbusy)]
    closers += conns
    busy = [c for c in conns if c.thread_index == 0]
    assert len(busy) == nbusy                   # idle connections are placed evenly
    by_ssrc, keys = {}, {}
    for k, c in enumerate(busy):
        c.attach(source(k))
        if encryptor is not None:
            c.set_frame_encryptor(encryptor)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(rx.getsockname())
        keys[6000 + k] = os.urandom(32)
        c.configure(tx.fileno(), 6000 + k, "aead_aes256_gcm_rtpsize", keys[6000 + k])
        by_ssrc[6000 + k] = c
        closers.append(tx)
    return by_ssrc, keys


def run_until_quiet(engine, rx, conns, quiet: float) -> list[bytes]:
    """Start ``engine``, confirm Speaking for ``conns``, collect what ``rx`` gets until it has been
    quiet for ``quiet`` seconds, then stop the engine. Returns the datagrams."""
    got: list[bytes] = []
    receiver = threading.Thread(target=lambda: got.extend(drain(rx, quiet)))
    receiver.start()
    engine.start()
    try:
        confirm_speaking_when_asked(conns)
        receiver.join(60)
    finally:
        engine.stop()
    return got


def test_a_busier_media_thread_hands_running_connections_over_without_losing_a_frame():
    """Rebalancing: connections placed evenly while idle, then only thread 0's start encoding. Within
    a few seconds thread 0 hands some of them to thread 1, between two ticks. Every stream, moved or
    not, arrives whole: contiguous sequence numbers, timestamps exactly one frame apart (no frame
    skipped or sent twice across the hand-over), every frame authentic (opened with `cryptography`)
    and the tone at its frequency (decoded with opuslib)."""
    seconds = 4.0
    with two_media_threads(work_ahead=True) as (native, engine, rx, closers):

        def tone_source(k):
            src = native.PcmSource(k + 1, int(seconds * 50) * 3840)
            src.write(stereo_tone(seconds, 300.0 + 50 * k, -12.0))
            src.end_input()
            return src

        by_ssrc, keys = busy_on_thread_0(native, engine, rx, closers, 12, tone_source)
        got = run_until_quiet(engine, rx, list(by_ssrc.values()), 1.5)
        moved = [c for c in by_ssrc.values() if c.thread_index == 1]
        stats = engine.stats()["threads"]
        counts = [c.stats() for c in by_ssrc.values()]
    assert stats[0]["moved_out"] >= 1 and stats[1]["moved_in"] == stats[0]["moved_out"], stats
    assert moved, "no connection changed thread"
    assert stats[1]["packets"] > 0
    assert {(c["skipped"], c["underruns"]) for c in counts} == {(0, 0)}, counts
    for ssrc, opened in open_streams(got, keys).items():
        k = ssrc - 6000
        seqs = [h.sequence for h, _, _ in opened]
        stamps = [h.timestamp for h, _, _ in opened]
        assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), (ssrc, seqs)
        assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:])), (ssrc, stamps)
        audio = [payload for _, _, payload in opened if payload != b"\xf8\xff\xfe"]
        assert len(audio) == int(seconds * 50), (ssrc, len(audio))
        dec = opuslib.Decoder(48000, 2)
        pcm = b"".join(dec.decode(p, 960) for p in audio)
        assert peak_frequency(active_part(left_channel(pcm))) == pytest.approx(300.0 + 50 * k, abs=2.0)


def test_an_overloaded_media_thread_hands_connections_over_and_the_other_catches_them_up():
    """A thread far behind its deadlines (its connections' frame encryptors sleep: 16 x 1.5 ms per
    tick) hands connections over anyway. The other thread first sends, late, the frames of the ticks
    the late one was behind by, then goes on on time: no tick is skipped, every packet arrives byte
    for byte and in order, timestamps one frame apart (opened with `cryptography`)."""
    frames = 200
    sent = {6000 + k: marked_packets(k, frames) for k in range(16)}

    def slow_identity(payload: bytes) -> bytes:
        time.sleep(0.0015)
        return payload

    with two_media_threads(work_ahead=False) as (native, engine, rx, closers):

        def marked_source(k):
            src = native.OpusSource(k + 1, 64 * 1277, frames)
            src.push_many(sent[6000 + k])
            src.end_input()
            return src

        by_ssrc, keys = busy_on_thread_0(native, engine, rx, closers, 16, marked_source, slow_identity)
        got = run_until_quiet(engine, rx, list(by_ssrc.values()), 2.0)
        stats = engine.stats()["threads"]
        skipped = {ssrc: c.stats()["skipped"] for ssrc, c in by_ssrc.items()}
        moved = {ssrc for ssrc, c in by_ssrc.items() if c.thread_index == 1}
    assert stats[0]["late_packets"] > 0, "thread 0 was never behind: the scenario did not happen"
    assert moved and stats[0]["moved_out"] >= len(moved), stats
    assert stats[1]["caught_up_frames"] > 0, stats        # the hand-over came while thread 0 was late
    assert set(skipped.values()) == {0}, skipped
    for ssrc, opened in open_streams(got, keys).items():
        seqs = [h.sequence for h, _, _ in opened]
        stamps = [h.timestamp for h, _, _ in opened]
        assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), ssrc
        assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:])), (ssrc, stamps)
        audio = [payload for _, _, payload in opened if payload != b"\xf8\xff\xfe"]
        assert audio == sent[ssrc], ssrc
