"""Outputs: files in every format decode back to the tone that went in (read with libsndfile via
soundfile, independent of telecom), resampling/channel conversion keep frequency and level, queues
iterate sync and async, closing mid-call leaves a valid file, long recordings keep memory flat."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from audio_checks import peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from telecom import AudioFrame, Client, ConfigurationError, Output, Playable
from telecom.output import Resampler

FRAME_NS = 20_000_000


def frames_of(pcm: bytes, *, user_id: int = 1, t0: int = 10**12):
    for i in range(len(pcm) // 3840):
        yield AudioFrame(user_id, t0 / 1e9 + i * 0.02, pcm[i * 3840:(i + 1) * 3840],
                         time_ns=t0 + i * FRAME_NS)


def feed(output, pcm: bytes, **kw) -> None:
    for frame in frames_of(pcm, **kw):
        output._deliver(frame)


# level tolerance: libsndfile's LAME mp3 comes back 1.7 dB quieter on this tone (measured), the rest
# within 1 dB
@pytest.mark.parametrize("fmt,tolerance,level_db", [("wav", 0.5, 0.1), ("flac", 0.5, 0.1), ("ogg", 2.0, 1.0),
                                                    ("opus", 2.0, 1.0), ("mp3", 2.0, 2.0)])
def test_every_file_format_decodes_to_the_tone(tmp_path, fmt, tolerance, level_db):
    path = tmp_path / f"tone.{fmt}"
    out = Output.to_file(path)
    feed(out, stereo_tone(1.0, 440.0))
    out.close()
    x, rate = sf.read(path, dtype="int16")
    assert rate == 48000 and x.shape[1] == 2
    assert len(x) / rate == pytest.approx(1.0, abs=0.06)   # lossy codecs pad a little
    left = x[:, 0].astype(np.float64)[4800:-4800]
    assert peak_frequency(left) == pytest.approx(440.0, abs=tolerance)
    assert rms_db(left) == pytest.approx(-9.03, abs=level_db)


def test_format_option_overrides_the_extension_and_bad_formats_fail_early(tmp_path):
    out = Output.to_file(tmp_path / "x.bin", format="flac")
    feed(out, stereo_tone(0.1, 440.0))
    out.close()
    assert (tmp_path / "x.bin").read_bytes()[:4] == b"fLaC"
    with pytest.raises(ConfigurationError, match="unsupported audio format"):
        Output.to_file(tmp_path / "x.aiff")
    with pytest.raises(ConfigurationError, match="Ogg/Opus"):
        Output.to_file(tmp_path / "x.opus", sample_rate=44100)
    with pytest.raises(ConfigurationError):
        Output.to_file(tmp_path / "missing-dir" / "x.wav")
    with pytest.raises(ConfigurationError):
        Output.to_file(tmp_path / "x.wav", channels=3)


def test_pauses_between_frames_become_silence_in_files(tmp_path):
    path = tmp_path / "gap.wav"
    out = Output.to_file(path)
    tone = stereo_tone(0.4, 440.0)
    feed(out, tone, t0=10**12)
    feed(out, tone, t0=10**12 + 1_400_000_000)     # 1 s after the first 0.4 s ended
    out.close()
    x = sf.read(path, dtype="int16")[0][:, 0]
    assert len(x) == int(1.8 * 48000)
    assert np.all(x[int(0.41 * 48000): int(1.39 * 48000)] == 0)
    assert out.stats()["gap_samples"] == 48000


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2), (24000, 1)])
def test_resampled_outputs_keep_frequency_and_level(rate, channels):
    frames = []
    out = Output.to_callback(frames.append, sample_rate=rate, channels=channels)
    feed(out, stereo_tone(1.0, 1000.0))
    pcm = b"".join(f.pcm for f in frames)
    assert all(f.sample_rate == rate and f.channels == channels for f in frames)
    x = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels)[:, 0].astype(np.float64)
    assert len(x) == pytest.approx(rate, abs=rate * 0.002)
    core = x[len(x) // 10: -len(x) // 10]
    on_48k_grid = np.interp(np.arange(0, len(core), rate / 48000), np.arange(len(core)), core)
    assert peak_frequency(on_48k_grid) == pytest.approx(1000.0, abs=3.0)
    assert rms_db(core) == pytest.approx(-9.03, abs=0.3)


def test_resampler_rejects_what_it_must_and_attenuates_above_nyquist():
    r = Resampler(48000, 16000, 1)
    t = np.arange(48000) / 48000
    alias = np.sin(2 * np.pi * 12000 * t)[:, None] * 10000   # above 8 kHz: must not fold back
    y = np.concatenate([r.process(alias[i:i + 960]) for i in range(0, 48000, 960)])
    assert np.sqrt(np.mean(y[200:] ** 2)) < 10000 / np.sqrt(2) * 10 ** (-60 / 20)
    with pytest.raises(ConfigurationError):
        Resampler(0, 16000, 1)


def test_queue_iterates_sync_and_async_and_counts_drops():
    q = Output.to_queue(maxsize=10)
    feed(q, stereo_tone(0.3, 440.0))        # 15 frames into a 10-frame queue
    q.close()
    got = list(q)
    assert len(got) == 10 and q.stats()["dropped"] == 5
    assert got[0].user_id == 1 and got[0].samples == 960 and got[0].array().shape == (960, 2)
    assert list(q) == []                    # still ended

    q2 = Output.to_queue()

    async def consume():
        return [f async for f in q2]

    def produce():
        time.sleep(0.05)
        feed(q2, stereo_tone(0.1, 440.0))
        q2.close()
    threading.Thread(target=produce).start()
    assert len(asyncio.run(consume())) == 5


def test_long_recording_keeps_memory_flat(tmp_path):
    out = Output.to_file(tmp_path / "long.flac")
    second = stereo_tone(1.0, 440.0)
    # Growth is counted for what the recording path allocated (any frame in telecom/output.py or this
    # test), not for threads that earlier tests left winding down in the same process.
    mine = [tracemalloc.Filter(True, "*/telecom/output.py", all_frames=True),
            tracemalloc.Filter(True, __file__, all_frames=True)]
    tracemalloc.start(32)
    try:
        for s in range(120):                              # two minutes: 23 MB of PCM
            feed(out, second, t0=10**12 + s * 1_000_000_000)
            if s == 10:
                base = tracemalloc.take_snapshot().filter_traces(mine)
        now = tracemalloc.take_snapshot().filter_traces(mine)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out.close()
    grown = sum(stat.size_diff for stat in now.compare_to(base, "filename"))
    assert sum(stat.size for stat in now.statistics("filename")) > 0     # the filters do match
    assert grown < 256 * 1024 and peak < 4 * 1024 * 1024
    assert sf.info(tmp_path / "long.flac").duration == pytest.approx(120.0, abs=0.02)


def test_closing_a_file_mid_call_leaves_a_valid_file_and_a_live_16k_mono_queue(voice_server, tmp_path):
    guild, channel, ua = new_ids()
    ub = ua + 1
    clients = []
    for uid in (ua, ub):
        creds = voice_server.create_session(guild, channel, uid)
        c = Client(uid, guild, creds.session_id, channel_id=channel)
        c.set_server_info(voice_server.url, creds.token)
        c.wait_ready(10)
        clients.append(c)
    a, b = clients
    path = tmp_path / "mid.ogg"
    file_out = Output.to_file(path)
    b.get_user(ua).set_output(file_out)
    pipe = Playable.from_pcm_pipe()
    a.play(pipe)
    pipe.send(stereo_tone(3.0, 440.0))
    pipe.close()
    time.sleep(1.2)
    file_out.close()                           # mid-call
    asr = Output.to_queue(sample_rate=16000, channels=1)
    b.get_user(ua).set_output(asr)             # replaces the (closed) file output
    pipe.done.result(6)
    time.sleep(0.4)
    asr.close()
    x = sf.read(path, dtype="int16")[0][:, 0].astype(np.float64)
    assert 0.8 < len(x) / 48000 < 1.3
    assert peak_frequency(x[4800:-4800]) == pytest.approx(440.0, abs=3.0)
    frames = list(asr)
    assert frames and all(f.sample_rate == 16000 and f.channels == 1 and f.user_id == ua for f in frames)
    y = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2").astype(np.float64)
    assert 1.4 < len(y) / 16000 < 2.2
    y48 = np.interp(np.arange(0, len(y) - 1, 1 / 3), np.arange(len(y)), y)   # back on the 48 kHz grid
    assert peak_frequency(y48[4800:-4800]) == pytest.approx(440.0, abs=3.0)
    for c in clients:
        c.close()
