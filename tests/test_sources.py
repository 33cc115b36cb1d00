"""URL and file playables, checked at the local voice server: tone files generated with PyAV, served by
a loopback HTTP(S) server (tests/media.py), decoded by the server's own Opus decoder and compared with
the signal that was written. No internet."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import media
from audio_checks import active_part, left_channel, peak_frequency, rms_db
from conftest import new_ids
from telecom import Client, Playable
from telecom.errors import ConfigurationError, SourceError, SourceNotFound
from telecom.sources import DecodeError, HttpStatusError, StreamDropped, TlsError

SILENCE = b"\xf8\xff\xfe"
TONE_RMS_DB = -6.0 - 3.01          # the files' sines peak at -6 dBFS


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def files(media_dir):
    """name -> path of every generated file."""
    out = {}
    for kind in ("mp3", "vorbis", "flac", "wav", "m4a", "opus", "webm"):
        path = media.tone_file(media_dir, kind, 1.5, 440.0)
        out[kind] = path
    out["flac660"] = media.tone_file(media_dir, "flac", 1.5, 660.0)
    out["mono"] = media.write_audio(os.path.join(media_dir, "mono.mp3"), "mp3",
                                    media.tone_samples(1.5, 440.0), channels=1)
    out["wav2"] = media.tone_file(media_dir, "wav", 2.0, 440.0)
    out["opus3"] = media.tone_file(media_dir, "opus", 3.0, 440.0)
    # 60 s: 440 Hz until 30.0 s, silence, an 880 Hz burst from 30.2 to 30.5 s, silence to 60 s.
    signal = np.zeros(60 * media.RATE, dtype=np.float32)
    signal[: 30 * media.RATE] = media.tone_samples(30.0, 440.0)
    burst = media.tone_samples(0.3, 880.0)
    start = int(30.2 * media.RATE)
    signal[start : start + len(burst)] = burst
    out["seek60"] = media.write_audio(os.path.join(media_dir, "seek60.flac"), "flac", signal)
    out["seek60opus"] = media.write_audio(os.path.join(media_dir, "seek60.opus"), "opus", signal)
    # A long quiet-ish file for the decode-ahead bound (flac keeps it small).
    out["long"] = media.write_audio(os.path.join(media_dir, "long.flac"), "flac",
                                    media.tone_samples(60.0, 330.0))
    m4a = open(out["m4a"], "rb").read()
    out["truncated"] = os.path.join(media_dir, "truncated.m4a")
    with open(out["truncated"], "wb") as f:
        f.write(m4a[: len(m4a) // 2])
    out["text"] = os.path.join(media_dir, "notes.mp3")
    with open(out["text"], "w") as f:
        f.write("these are my notes, not audio\n" * 200)
    return out


@pytest.fixture(scope="module")
def http(files):
    served = {os.path.basename(p): open(p, "rb").read() for p in files.values()}
    with media.MediaServer(served) as server:
        yield server


def url(http, files, key, route="f"):
    return http.url(f"/{route}/{os.path.basename(files[key])}")


def join(server) -> tuple[Client, int]:
    guild, channel, user = new_ids()
    creds = server.create_session(guild, channel, user)
    client = Client(user, guild, creds.session_id, channel_id=channel)
    client.set_server_info(server.url, creds.token)
    client.wait_ready(10)
    return client, user


def wait_quiet(server, user, timeout=5.0):
    server.wait_for_sync(lambda: (ev := server.record(user).speaking_events) and ev[-1][1] == 0, timeout)


def decoded(server, user) -> np.ndarray:
    return left_channel(server.record(user).pcm())


def loud_span_seconds(x: np.ndarray, threshold: float = 2000.0) -> float:
    loud = np.flatnonzero(np.abs(x) > threshold)
    return (loud[-1] - loud[0] + 1) / 48000 if len(loud) else 0.0


def collect(client) -> list:
    events: list = []
    client.on("*", events.append)
    return events


def named(events, name, playable=None):
    return [e for e in events if e.name == name and (playable is None or e.data.get("playable") is playable)]


# -- formats ----------------------------------------------------------------------------------------------
def test_formats_over_local_http_play_at_the_right_frequency_level_and_duration(voice_server, files, http):
    kinds = ["mp3", "vorbis", "flac", "wav", "m4a", "mono"]     # mono: as loud as stereo, on both sides
    runs = []
    for kind in kinds:
        client, user = join(voice_server)
        track = Playable.from_url(url(http, files, kind))
        assert track.state == "loading" and track.duration is None
        client.play(track)
        runs.append((kind, client, user, track))
    try:
        for kind, client, user, track in runs:
            assert track.done.result(10) == "ended", kind
            assert track.state == "ended" and track.end_reason == "finished"
            assert track.duration == pytest.approx(1.5, abs=0.01), kind
            assert track.position == pytest.approx(1.5, abs=0.021), kind
            assert not track.passthrough
        for kind, client, user, track in runs:
            wait_quiet(voice_server, user)
            x = decoded(voice_server, user)
            audio = active_part(x)
            assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0), kind
            assert rms_db(audio) == pytest.approx(TONE_RMS_DB, abs=1.0), kind
            assert loud_span_seconds(x) == pytest.approx(1.5, abs=0.040), kind
            assert voice_server.violations(user) == [], kind
            right = np.frombuffer(voice_server.record(user).pcm(), dtype="<i2").reshape(-1, 2)[:, 1]
            assert rms_db(active_part(right.astype(np.float64))) == pytest.approx(TONE_RMS_DB, abs=1.0), kind
    finally:
        for _kind, client, _user, _track in runs:
            client.close()


def test_state_goes_loading_playing_ended_and_events_carry_the_reason(voice_server, files, http):
    client, user = join(voice_server)
    events = collect(client)
    track = Playable.from_file(files["wav"])
    assert track.state == "loading"
    client.play(track)
    assert media.wait_until(lambda: track.state == "playing", 5)
    assert track.done.result(10) == "ended"
    assert media.wait_until(lambda: named(events, "track_end", track), 2)
    (end,) = named(events, "track_end", track)
    assert end.reason == "finished" and end.error is None
    assert [e.name for e in events if e.data.get("playable") is track] == ["track_start", "track_end"]
    client.close()


def test_missing_file_raises_at_once_and_bad_arguments_are_configuration_errors(files):
    with pytest.raises(SourceNotFound) as info:
        Playable.from_file(os.path.join(os.path.dirname(files["wav"]), "nope.wav"))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ConfigurationError):
        Playable.from_url("ftp://example.com/a.mp3")
    with pytest.raises(ConfigurationError):
        Playable.from_url("http:///nohost")
    with pytest.raises(ConfigurationError):
        Playable.from_url("https://example.com/a.mp3", read_timeout=0)
    with pytest.raises(ConfigurationError):
        Playable.from_url("https://example.com/a.mp3", ssl="/no/such/ca.pem")
    with pytest.raises(ConfigurationError):
        Playable.from_file(files["wav"], ahead_seconds=0)
    with pytest.raises(ConfigurationError):
        Playable.from_pcm_pipe().seek(1.0)


# -- Opus passthrough ---------------------------------------------------------------------------------------
def _needs_opus_pipe():
    from telecom import playable

    if not hasattr(playable, "OpusPipe"):
        pytest.skip("the engine's Opus passthrough input (OpusPipe) is not there yet")


def test_ogg_opus_passes_through_byte_identical_then_reencodes_at_50_percent(voice_server, files, http):
    _needs_opus_pipe()
    file_packets = media.ogg_packets(open(files["opus3"], "rb").read())
    assert file_packets[0].startswith(b"OpusHead") and file_packets[1].startswith(b"OpusTags")
    audio_packets = file_packets[2:]
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, "opus3")))
    assert media.wait_until(lambda: track.position >= 1.0, 5)
    track.set_volume(50)
    assert track.done.result(10) == "ended"
    assert track.passthrough and track.passthrough_refusal is None
    assert media.wait_until(lambda: track not in client.playables, 2)   # forgotten once ended
    wait_quiet(voice_server, user)
    record = voice_server.record(user)
    payloads = [p.payload for p in record.packets if p.payload != SILENCE]
    assert len(payloads) == len(audio_packets)
    # Passed through as they are in the file until the volume changed, re-encoded afterwards.
    same = 0
    while same < len(payloads) and payloads[same] == audio_packets[same]:
        same += 1
    assert same >= 45                       # ~1 s at 100 %
    assert all(a != b for a, b in zip(payloads[same + 1 :], audio_packets[same + 1 :]))
    # No gap at the switch: seq and timestamps contiguous across the whole track.
    seqs = [p.sequence for p in record.packets]
    stamps = [p.timestamp for p in record.packets]
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:]))
    assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:]))
    x = decoded(voice_server, user)
    split = (same + 5) * 960
    before, after = x[4800 : same * 960 - 960], x[split : split + 48000]
    assert rms_db(after) - rms_db(before) == pytest.approx(-6.02, abs=1.0)
    assert peak_frequency(after) == pytest.approx(440.0, abs=2.0)
    assert voice_server.violations(user) == []
    client.close()


def test_webm_opus_passes_through_the_demuxed_packets(voice_server, files, http):
    _needs_opus_pipe()
    import av

    with av.open(files["webm"]) as container:
        expected = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, "webm")))
    assert track.done.result(10) == "ended"
    assert track.passthrough and track.container_format.startswith("matroska")
    wait_quiet(voice_server, user)
    payloads = [p.payload for p in voice_server.record(user).packets if p.payload != SILENCE]
    assert payloads == expected
    client.close()


def test_opus_header_rules_and_packet_durations():
    from telecom.sources.demux import OpusHead, opus_packet_ms

    assert opus_packet_ms(bytes([0xFC, 0, 0])) == 20.0      # CELT FB 20 ms, one frame
    assert opus_packet_ms(bytes([0xF8])) == 20.0
    assert opus_packet_ms(bytes([0xFD, 0])) == 40.0         # two 20 ms frames
    assert opus_packet_ms(bytes([0xF3, 0x03])) == 30.0      # CELT FB 10 ms, code 3: three frames
    assert opus_packet_ms(bytes([0x08])) == 20.0            # SILK NB 20 ms
    assert opus_packet_ms(bytes([0x18])) == 60.0            # SILK NB 60 ms
    # Splitting multi-frame packets into 20 ms single-frame packets (RFC 6716 §3.2), hand-made packets:
    from telecom.sources.demux import opus_frames, split_to_20ms

    a, b, c = b"\x11" * 5, b"\x22" * 300, b"\x33" * 7
    assert opus_frames(bytes([0xFC]) + a) == [a]                                 # code 0
    assert opus_frames(bytes([0xFD]) + a + a) == [a, a]                          # code 1: equal halves
    assert opus_frames(bytes([0xFE, 5]) + a + c) == [a, c]                       # code 2: first length
    assert opus_frames(bytes([0xFE, 252, 12]) + bytes(300) + c)[0] == bytes(300)  # 2-byte length 300
    assert opus_frames(bytes([0xFF, 0x03]) + a + a + a) == [a, a, a]             # code 3 CBR
    assert opus_frames(bytes([0xFF, 0x83, 5, 252, 12]) + a + b + c) == [a, b, c]  # code 3 VBR
    assert opus_frames(bytes([0xFF, 0x43, 2]) + a * 3 + b"\0\0") == [a, a, a]   # code 3 CBR + 2 B padding
    assert split_to_20ms(bytes([0xFF, 0x03]) + a * 3) == [bytes([0xFC]) + a] * 3   # CELT FB 60 ms -> 3 x 20
    assert split_to_20ms(bytes([0x18]) + a) is None                              # SILK 60 ms: one frame
    assert split_to_20ms(bytes([0xF3, 0x03]) + a * 3) is None                    # CELT 10 ms frames
    for bad in (bytes([0xFD]) + a, bytes([0xFE, 200]) + a, bytes([0xFF, 0x00]), bytes([0xFF, 0x03]) + a):
        with pytest.raises(ValueError):
            opus_frames(bad)
    head = OpusHead.parse(b"OpusHead" + bytes([1, 2]) + (312).to_bytes(2, "little")
                          + (48000).to_bytes(4, "little") + (-256).to_bytes(2, "little", signed=True) + b"\0")
    assert (head.channels, head.pre_skip, head.output_gain_q8, head.mapping_family) == (2, 312, -256, 0)


def test_opus_variants_pass_through_or_decode_by_the_rules(voice_server, files, http, media_dir):
    _needs_opus_pipe()
    tone = media.tone_samples(1.5, 440.0)
    mono = media.write_audio(os.path.join(media_dir, "mono.opus"), "opus", tone, channels=1)
    long_frames = media.write_audio(os.path.join(media_dir, "f60.opus"), "opus", tone,
                                    options={"frame_duration": "60"})
    runs = []
    for path in (mono, long_frames):
        client, user = join(voice_server)
        runs.append((path, client, user, client.play(Playable.from_file(path))))
    for path, client, user, track in runs:
        assert track.done.result(10) == "ended", path
        wait_quiet(voice_server, user)
        pcm = np.frombuffer(voice_server.record(user).pcm(), dtype="<i2").reshape(-1, 2).astype(np.float64)
        for channel in (0, 1):
            audio = active_part(pcm[:, channel])
            assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0), path
            assert rms_db(audio) == pytest.approx(TONE_RMS_DB, abs=1.0), path
        client.close()
    (_, _, mono_user, mono_track), (_, _, _, long_track) = runs
    # Mono 20 ms packets go out as they are (receivers decode mono packets to both sides) ...
    assert mono_track.passthrough
    sent = [p.payload for p in voice_server.record(mono_user).packets if p.payload != SILENCE]
    assert sent == media.ogg_packets(open(mono, "rb").read())[2:]
    # ... and 60 ms packets (three 20 ms CELT frames each) are split into one packet per frame, undecoded:
    # every frame of the file, in order, each behind a code-0 TOC with the packet's configuration.
    assert long_track.passthrough and long_track.passthrough_refusal is None
    long_user = runs[1][2]
    sent = [p.payload for p in voice_server.record(long_user).packets if p.payload != SILENCE]
    file_packets = media.ogg_packets(open(long_frames, "rb").read())[2:]
    assert len(sent) == 3 * len(file_packets)
    for i, packet in enumerate(file_packets):
        pieces = sent[3 * i:3 * i + 3]
        assert all(piece[0] == packet[0] & 0xFC for piece in pieces)        # same config, code 0
        assert packet[0] & 0x03 == 3 and packet[1] & 0x3F == 3                # source: code 3, 3 frames
        assert packet.endswith(pieces[-1][1:]) and all(piece[1:] in packet for piece in pieces)


def _opuslib_stream(seconds: float, sizes: list[int]) -> list[bytes]:
    """A 440 Hz tone cut into Opus packets of the given sample counts by opuslib (not telecom)."""
    import opuslib

    tone = media.tone_samples(seconds, 440.0)
    pcm = np.repeat(np.round(tone * 32767).astype("<i2"), 2).tobytes()
    encoder = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    packets, pos = [], 0
    for n in sizes:
        packets.append(encoder.encode(pcm[pos * 4:(pos + n) * 4], n))
        pos += n
    return packets


def test_passthrough_reencodes_where_the_frame_size_changes(voice_server, media_dir):
    """Files of 20 ms packets with 10 ms packets in the middle (an Ogg writer of the tests' own, opuslib's
    packets). Two 10 ms packets realign: the 20 ms packets on both sides go out as they are, the 10 ms
    section as re-encoded 20 ms packets, and the tone plays through it at the same level. A lone 10 ms
    packet never realigns: the rest of the stream is re-encoded, its last half frame padded."""
    _needs_opus_pipe()
    realign_sizes = [960] * 50 + [480] * 20 + [960] * 50         # 1 s, 0.2 s in 10 ms frames, 1 s
    lone_sizes = [960] * 50 + [480] + [960] * 50
    cases = []
    for name, sizes in (("realign", realign_sizes), ("lone", lone_sizes)):
        packets = _opuslib_stream(sum(sizes) / 48000, sizes)
        path = media.write_ogg_opus(os.path.join(media_dir, f"switch-{name}.opus"), packets, sizes)
        assert media.ogg_packets(open(path, "rb").read())[2:] == packets
        client, user = join(voice_server)
        cases.append((packets, client, user, client.play(Playable.from_file(path))))
    for packets, client, user, track in cases:
        assert track.done.result(10) == "ended"
        assert track.passthrough and track.error is None
        wait_quiet(voice_server, user)
        record = voice_server.record(user)
        pcm = np.frombuffer(record.pcm(), dtype="<i2").reshape(-1, 2).astype(np.float64)
        audio = active_part(pcm[:, 0])
        assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
        assert rms_db(audio) == pytest.approx(TONE_RMS_DB, abs=1.0)
        # No gap and no dip where the frames were re-encoded, frame by frame over 0.9-1.3 s of the
        # tone. (A decoder started cold there played ~100 ms up to 10 dB low; the first 10 ms packet
        # itself is 9 bytes, which a continuous decode of the file plays 3 dB low too.)
        start = next(i for i, p in enumerate(record.packets) if p.payload != SILENCE) * 960
        levels = [rms_db(pcm[k:k + 960, 0]) for k in range(start + 43200, start + 62400, 960)]
        assert all(abs(level - TONE_RMS_DB) < 3.0 for level in levels), [round(x, 1) for x in levels]
        client.close()
    (realign, _, realign_user, realign_track), (lone, _, lone_user, lone_track) = cases
    sent = [p.payload for p in voice_server.record(realign_user).packets if p.payload != SILENCE]
    assert realign_track.reencoded_frames == 10 and len(sent) == 110
    assert sent[:50] == realign[:50] and sent[60:] == realign[70:]
    assert not set(sent[50:60]) & set(realign[50:70])
    sent = [p.payload for p in voice_server.record(lone_user).packets if p.payload != SILENCE]
    assert lone_track.reencoded_frames == 51 and len(sent) == 101
    assert sent[:50] == lone[:50] and not set(sent[50:]) & set(lone[50:])


def test_opus_header_gain_or_surround_is_refused_for_passthrough():
    from types import SimpleNamespace

    from telecom.sources.demux import passthrough_refusal

    def head(channels=2, gain=0, family=0):
        return (b"OpusHead" + bytes([1, channels]) + (312).to_bytes(2, "little")
                + (48000).to_bytes(4, "little")
                + gain.to_bytes(2, "little", signed=True) + bytes([family]))

    def probe(extradata, fmt="ogg", codec="opus", rate=48000):
        codec_context = SimpleNamespace(name=codec, sample_rate=rate, extradata=extradata)
        stream = SimpleNamespace(codec_context=codec_context)
        return passthrough_refusal(SimpleNamespace(format=SimpleNamespace(name=fmt)), stream)

    assert probe(head()) is None
    assert probe(head(), fmt="matroska,webm") is None
    assert "gain" in probe(head(gain=-512))
    assert "mapping family 1" in probe(head(channels=6, family=1))
    assert "mp4" in probe(head(), fmt="mov,mp4,m4a,3gp,3g2,mj2")
    assert "vorbis" in probe(head(), codec="vorbis")
    assert "OpusHead" in probe(b"garbage")


def test_tracks_beyond_the_decoder_bound_wait_then_play(voice_server, files):
    from telecom.sources import configure
    from telecom.sources.decode import get_pool

    client, user = join(voice_server)
    assert media.wait_until(lambda: get_pool().running == 0, 5), get_pool().running
    configure(max_decoders=1)
    try:
        first = client.play(Playable.from_file(files["long"], ahead_seconds=1.0))   # its decoder stays busy
        second = client.play(Playable.from_file(files["flac660"]))
        assert media.wait_until(lambda: first.state == "playing", 5), (first.state, get_pool().running)
        time.sleep(0.5)
        assert second.state == "loading" and get_pool().running == 1 and len(media.decode_threads()) == 1
        first.stop()
        assert second.done.result(10) == "ended" and first.done.result(1) == "ended"
    finally:
        configure(max_decoders=64)
    wait_quiet(voice_server, user)
    x = decoded(voice_server, user)
    loud = np.flatnonzero(np.abs(x) > 2000)
    head, tail = x[loud[0] + 4800 : loud[0] + 4800 + 24000], x[loud[-1] - 4800 - 24000 : loud[-1] - 4800]
    assert peak_frequency(head) == pytest.approx(330.0, abs=2.0)
    assert peak_frequency(tail) == pytest.approx(660.0, abs=2.0)
    client.close()


def test_passthrough_can_be_refused_and_then_decodes(voice_server, files, http):
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, "opus"), passthrough=False))
    assert track.done.result(10) == "ended"
    assert not track.passthrough and track.passthrough_refusal == "passthrough=False"
    wait_quiet(voice_server, user)
    x = decoded(voice_server, user)
    assert peak_frequency(active_part(x)) == pytest.approx(440.0, abs=2.0)
    assert loud_span_seconds(x) == pytest.approx(1.5, abs=0.040)
    client.close()


# -- mixing ---------------------------------------------------------------------------------------------
def test_two_tracks_are_mixed(voice_server, files, http):
    client, user = join(voice_server)
    a = client.play(Playable.from_url(url(http, files, "mp3")))
    b = client.play(Playable.from_file(files["flac660"]))
    assert a.done.result(10) == "ended" and b.done.result(10) == "ended"
    wait_quiet(voice_server, user)
    audio = active_part(decoded(voice_server, user))
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1 / 48000)

    def level(f):
        return spectrum[np.abs(freqs - f) < 5].max()

    assert level(440) > 100 * level(550) and level(660) > 100 * level(550)
    assert level(440) == pytest.approx(level(660), rel=0.3)
    client.close()


def test_replace_ends_the_others_with_reason_replaced_and_stop_with_stopped(voice_server, files, http):
    client, user = join(voice_server)
    events = collect(client)
    first = client.play(Playable.from_file(files["long"]))
    assert media.wait_until(lambda: first.state == "playing", 5)
    second = client.play(Playable.from_file(files["wav"]), replace=True)
    assert first.done.result(5) == "ended"
    assert media.wait_until(lambda: second.state == "playing", 5)
    second.stop()
    assert second.done.result(5) == "ended"
    assert media.wait_until(lambda: len(named(events, "track_end")) == 2, 3)
    reasons = {e.playable: e.reason for e in named(events, "track_end")}
    assert reasons == {first: "replaced", second: "stopped"}
    assert media.wait_until(lambda: not media.decode_threads(), 3)
    client.close()


# -- seek, pause, position --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["seek60", "seek60opus"])
def test_seek_to_30_s_of_60_lands_within_one_frame(voice_server, files, http, key):
    if key == "seek60opus":
        _needs_opus_pipe()
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, key)))
    assert media.wait_until(lambda: track.position >= 0.6, 5)
    assert track.duration == pytest.approx(60.0, abs=0.01) and track.seekable
    track.seek(30.0)
    assert media.wait_until(lambda: track.position >= 30.0, 3)
    assert media.wait_until(lambda: track.position >= 30.8, 3)
    assert track.position < 32.0
    track.stop()
    assert track.done.result(5) == "ended"
    wait_quiet(voice_server, user)
    # The seek was a ranged request into the file, not a re-read from the start.
    assert any(path.endswith(os.path.basename(files[key])) and rng for path, rng in http.requests)
    assert track.passthrough == (key == "seek60opus")
    x = decoded(voice_server, user)
    loud = np.flatnonzero(np.abs(x) > 2000)
    gaps = np.flatnonzero(np.diff(loud) > 2400)          # the silence between 440 Hz and the burst
    assert len(gaps) == 1
    end_440, start_burst = loud[gaps[0]], loud[gaps[0] + 1]
    gap = (start_burst - end_440) / 48000
    # In the file the burst starts 0.200 s after 30.0 s: a seek landing at 30.0 + e leaves 0.200 - e.
    assert gap == pytest.approx(0.200, abs=0.020 + 0.003)
    burst = x[start_burst + 480 : start_burst + 480 + 9600]
    assert peak_frequency(burst) == pytest.approx(880.0, abs=5.0)
    with pytest.raises(ConfigurationError):
        track.seek(1.0)                                   # ended
    client.close()


def test_seek_argument_checks_and_a_never_played_track_stops_cleanly(files):
    track = Playable.from_file(files["wav"])
    with pytest.raises(ConfigurationError):
        track.seek(-1)
    with pytest.raises(ConfigurationError):
        track.seek("soon")
    track.stop()
    assert track.done.result(1) == "ended" and track.end_reason == "stopped"


def test_redirects_are_checked_per_hop():
    from telecom.sources.http import default_redirect_check

    default_redirect_check("http://a/x", "https://b/y")
    default_redirect_check("https://a/x", "https://b/y")
    with pytest.raises(SourceError):
        default_redirect_check("https://a/x", "http://b/y")     # no downgrade to plain text
    with pytest.raises(SourceError):
        default_redirect_check("http://a/x", "file:///etc/passwd")


def test_pause_resume_keeps_the_timeline(voice_server, files, http):
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, "wav2")))
    assert media.wait_until(lambda: track.position >= 0.5, 5)
    track.pause()
    time.sleep(0.1)
    assert track.state == "paused"
    held = track.position
    time.sleep(0.5)
    assert track.position == held
    track.resume()
    assert track.done.result(10) == "ended"
    assert track.position == pytest.approx(2.0, abs=0.021)
    wait_quiet(voice_server, user)
    record = voice_server.record(user)
    audio = [p for p in record.packets if p.payload != SILENCE]
    assert abs(len(audio) - 100) <= 1                    # 2.0 s of frames: nothing lost or repeated
    x = decoded(voice_server, user)
    loud = np.flatnonzero(np.abs(x) > 2000)
    assert (len(np.unique(loud // 960))) * 0.020 == pytest.approx(2.0, abs=0.060)
    client.close()


# -- network behaviour and errors --------------------------------------------------------------------------
def test_dropped_stream_reconnects_with_a_range_and_plays_complete(voice_server, files, http):
    client, user = join(voice_server)
    events = collect(client)
    track = client.play(Playable.from_url(url(http, files, "wav2", "drop-once")))
    assert track.done.result(10) == "ended"
    assert track.stats()["reconnects"] == 1 and not named(events, "track_error")
    name = os.path.basename(files["wav2"])
    ranged = [rng for path, rng in http.requests if path == f"/drop-once/{name}" and rng]
    # (FFmpeg's probe seeks back to the data chunk once: bytes=78-.) The reconnect resumed at the cut.
    assert ranged.count(f"bytes={len(open(files['wav2'], 'rb').read()) // 2}-") == 1
    wait_quiet(voice_server, user)
    x = decoded(voice_server, user)
    assert loud_span_seconds(x) == pytest.approx(2.0, abs=0.040)
    loud = np.flatnonzero(np.abs(x) > 2000)
    assert np.diff(loud).max() < 200                     # no hole where the connection dropped
    client.close()


def test_stopping_a_track_on_a_stalled_server_frees_its_thread_at_once(voice_server, files, http):
    client, user = join(voice_server)
    events = collect(client)
    # The server sends half of the 60 s file and then nothing, keeping the socket open; with a ring of
    # 60 s the decode thread takes those ~30 s at once and then waits in recv() on the silent server.
    track = client.play(Playable.from_url(url(http, files, "long", "stall"), read_timeout=30,
                                          ahead_seconds=60))
    assert media.wait_until(lambda: track.decoded_ahead >= 25.0, 10), track.decoded_ahead
    time.sleep(0.3)
    assert track.state == "playing" and media.decode_threads()
    track.stop()
    # Without the abort the thread would sit in recv() until the 30 s read timeout.
    assert media.wait_until(lambda: not media.decode_threads(), 5)
    assert track.done.result(2) == "ended" and not named(events, "track_error")
    client.close()


def test_redirect_and_live_stream_without_length(voice_server, files, http):
    client, user = join(voice_server)
    redirected = client.play(Playable.from_url(url(http, files, "mp3", "redirect")))
    assert redirected.done.result(10) == "ended"
    live = Playable.from_url(url(http, files, "mp3", "live"))
    client.play(live)
    assert media.wait_until(lambda: live.state == "playing", 5)
    assert live.duration is None and live.seekable is False
    with pytest.raises(ConfigurationError):
        live.seek(0.5)
    assert live.done.result(10) == "ended"
    assert live.position == pytest.approx(1.5, abs=0.05)
    client.close()


def test_failures_become_error_events_and_leave_nothing_behind(voice_server, files, http, media_dir):
    from telecom.testing import certs

    client, user = join(voice_server)
    events = collect(client)
    os.makedirs(os.path.join(media_dir, "tls"), exist_ok=True)
    cert_files = certs.generate(os.path.join(media_dir, "tls"))
    gc.collect()
    fds_before = media.open_fds()
    threads_before = threading.active_count()
    # A PCM tone keeps playing next to the failures: the client and its other playables go on.
    from audio_checks import stereo_tone

    pipe = Playable.from_pcm_pipe()
    pipe.send(stereo_tone(2.0, 440.0))
    pipe.close()
    client.play(pipe)
    served = {"tone.mp3": open(files["mp3"], "rb").read()}
    with media.MediaServer(served, ssl_context=cert_files.server_context()) as https:
        cases = {
            "drop": (Playable.from_url(url(http, files, "wav2", "drop-always"), reconnects=2), StreamDropped),
            "404": (Playable.from_url(http.url("/f/missing.mp3")), HttpStatusError),
            "truncated": (Playable.from_url(url(http, files, "truncated")), DecodeError),
            "text": (Playable.from_url(url(http, files, "text")), DecodeError),
            "tls": (Playable.from_url(https.url("/f/tone.mp3")), TlsError),
            "refused": (Playable.from_url("http://127.0.0.1:9/x.mp3", connect_timeout=2), SourceError),
            "timeout": (Playable.from_url(url(http, files, "wav2", "stall"), read_timeout=0.3, reconnects=1),
                        StreamDropped),
        }
        good_tls = Playable.from_url(https.url("/f/tone.mp3"), ssl=cert_files.ca_file)
        for track, _ in cases.values():
            client.play(track)
        client.play(good_tls)
        for name, (track, kind) in cases.items():
            with pytest.raises(kind) as info:
                track.done.result(15)
            assert track.state == "error", name
            assert track.error is info.value
        assert good_tls.done.result(10) == "ended"
    assert cases["404"][0].error.status == 404
    assert "certificate" in str(cases["tls"][0].error)
    assert "unsupported or corrupt" in str(cases["text"][0].error)
    assert "timed out" in str(cases["timeout"][0].error) and "1 attempts" in str(cases["timeout"][0].error)
    assert "refused" in str(cases["refused"][0].error).lower()
    assert media.wait_until(lambda: all(named(events, "track_end", t) for t, _ in cases.values()), 5)
    for name, (track, kind) in cases.items():
        (err,) = named(events, "track_error", track)
        assert isinstance(err.error, kind) and err.cause == str(err.error), name
        (end,) = named(events, "track_end", track)
        assert end.reason == "error" and end.error is err.error, name
        assert events.index(err) < events.index(end)
    assert pipe.done.result(5) == "ended"
    wait_quiet(voice_server, user)
    # The PCM tone and the good https track were heard: 440 Hz at the right level.
    audio = active_part(decoded(voice_server, user))
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    # No decode thread, HTTP connection or PyAV container left behind.
    assert media.wait_until(lambda: not media.decode_threads(), 5), media.decode_threads()
    gc.collect()
    assert media.wait_until(lambda: media.open_fds() <= fds_before, 5), (media.open_fds(), fds_before)
    assert media.wait_until(lambda: threading.active_count() <= threads_before, 5)
    client.close()


# -- decode-ahead bound --------------------------------------------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_decode_ahead_is_bounded_and_memory_stays_flat(voice_server, files, http):
    client, user = join(voice_server)
    track = client.play(Playable.from_url(url(http, files, "long"), ahead_seconds=1.0))
    assert media.wait_until(lambda: track.position >= 0.5, 5)
    samples, rss = [], []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        samples.append(track.decoded_ahead)
        rss.append(_rss_kib())
        time.sleep(0.02)
    track.stop()
    assert track.done.result(5) == "ended"
    # The worker stays ahead (it keeps the ring full) but never by more than the ring plus one frame.
    assert max(samples) <= 1.0 + 0.1 and track.max_ahead_seconds <= 1.1
    assert np.median(samples) >= 0.8
    # The buffered amount is bounded, so memory is flat while a 60 s track streams.
    assert max(rss[len(rss) // 2 :]) - min(rss[: len(rss) // 2]) < 4096
    client.close()


class FastRing:
    """Stands in for the native PCM ring with a clock ``speed`` times faster than real time: a thread
    drains it at ``speed`` x 192 kB/s, so ten minutes of audio stream through the decode worker in
    seconds."""

    def __init__(self, capacity: int, wake, speed: float = 100.0) -> None:
        self._wake = wake                # the worker sleeps for real-time drain; wake it at our clock
        self.capacity, self.buffered, self.frames_played = capacity, 0, 0
        self.state, self.ended, self.total = "playing", False, 0
        self.max_buffered = 0
        self._lock = threading.Lock()
        self._rate = 192000 * speed
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        last = time.monotonic()
        while not (self.ended and self.buffered == 0):
            time.sleep(0.002)
            now = time.monotonic()
            with self._lock:
                frames = min(self.buffered // 3840, int((now - last) * self._rate) // 3840)
                if frames:
                    self.buffered -= frames * 3840
                    self.frames_played += frames
                    last = now
            if frames:
                with self._wake:
                    self._wake.notify_all()

    def write(self, view, partial=False):
        with self._lock:
            n = min(len(view), self.capacity - self.buffered)
            self.buffered += n
            self.total += n
            self.max_buffered = max(self.max_buffered, self.buffered)
            return n

    def end_input(self):
        self.ended = True

    def clear(self):
        with self._lock:
            self.buffered = 0


def test_ten_minutes_at_a_fast_clock_keep_memory_flat_and_the_ring_bounded(http):
    from telecom.sources.decode import run_track

    track = Playable.from_url(http.url("/sine/600.wav"), ahead_seconds=1.0)
    ring = FastRing(track._source.capacity, track._cond, speed=200.0)
    track._source = ring                 # the decode worker only writes, waits for room and ends input
    rss = []
    sampler_done = threading.Event()

    def sample():
        while not sampler_done.is_set():
            rss.append((ring.total, _rss_kib()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    run_track(track)                     # in this thread, synchronously
    sampler_done.set()
    sampler.join()
    assert track.error is None and ring.ended
    assert ring.total == 600 * 192000    # every byte of the ten minutes went through
    assert ring.max_buffered <= track._source.capacity == 192000
    assert track.max_ahead_seconds <= 1.0 + 0.1
    # After the first minute, resident memory does not grow with the length of the track.
    settled = [kib for total, kib in rss if total > 60 * 192000]
    assert len(settled) >= 5 and max(settled) - settled[0] < 2048, (settled[0], max(settled))
    print(f"600 s streamed in {time.monotonic() - started:.1f} s; RSS {settled[0]}..{max(settled)} KiB")


# -- PCM pipes in other formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,channels,fmt", [(24000, 1, "f32"), (44100, 2, "s16"), (16000, 1, "s16")])
def test_pcm_pipe_converts_rate_channels_and_format(voice_server, rate, channels, fmt):
    client, user = join(voice_server)
    pipe = Playable.from_pcm_pipe(sample_rate=rate, channels=channels, sample_format=fmt)
    t = np.arange(int(1.0 * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    data = np.repeat(mono, channels)
    raw = data.astype("<f4").tobytes() if fmt == "f32" else np.round(data * 32767).astype("<i2").tobytes()
    step = len(raw) // 7 + 1                              # odd piece sizes, cutting through samples
    for start in range(0, len(raw), step):
        pipe.send(raw[start : start + step])
    pipe.close()
    client.play(pipe)
    assert pipe.done.result(10) == "ended"
    wait_quiet(voice_server, user)
    x = decoded(voice_server, user)
    assert peak_frequency(active_part(x)) == pytest.approx(440.0, abs=2.0)
    assert rms_db(active_part(x)) == pytest.approx(TONE_RMS_DB, abs=1.0)
    assert loud_span_seconds(x) == pytest.approx(1.0, abs=0.040)
    client.close()


def test_pcm_pipe_conversion_rejects_bad_formats():
    with pytest.raises(ConfigurationError):
        Playable.from_pcm_pipe(sample_rate=1000)
    with pytest.raises(ConfigurationError):
        Playable.from_pcm_pipe(channels=6, sample_rate=44100)
    with pytest.raises(ConfigurationError):
        Playable.from_pcm_pipe(sample_format="u8", sample_rate=44100)


def test_opus_frame_parser_never_crashes_and_never_invents_bytes():
    """Any byte string is either refused with ValueError or split into frames that are pieces of it,
    in order, no longer in total than the packet minus its TOC byte."""
    from hypothesis import given, settings, strategies as st

    from telecom.sources.demux import opus_frames, split_to_20ms

    @settings(max_examples=3000, deadline=None)
    @given(st.binary(min_size=0, max_size=700))
    def check(packet):
        try:
            frames = opus_frames(packet)
        except ValueError:
            return
        assert frames and sum(len(f) for f in frames) <= len(packet) - 1
        pos = 1
        for frame in frames:
            found = packet.find(frame, pos) if frame else pos
            assert found >= pos
            pos = found + len(frame)
        pieces = split_to_20ms(packet)
        if pieces is not None:
            assert [p[1:] for p in pieces] == frames and all(p[0] & 3 == 0 for p in pieces)

    check()
