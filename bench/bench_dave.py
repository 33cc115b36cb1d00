"""DAVE figures: per-frame E2EE cost, and the frames a peer loses around a transition.

Run: ``.venv/bin/python bench/bench_dave.py`` (prints a table, writes ``bench/results/dave.json``).

1. Cost per 20 ms Opus frame (120 bytes) of ``DaveSessionManager.encrypt`` (the engine's frame
   encryptor: lock + davey) against bare ``davey.DaveSession.encrypt_opus``, and of ``decrypt``.
2. Transition skew: a telecom client plays a tone to a davey peer; a third member joins, and the
   local voice server delivers op 29 to the peer ``skew`` seconds later than to the client (a slower
   link). davey switches the client's sender key inside ``process_commit`` (not at op 22), so the
   peer cannot decrypt the client's frames until it has processed the commit itself: expect about
   ``skew / 20 ms`` lost frames. Figures only; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import platform
import sys
import threading
import time

import davey

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from audio_checks import stereo_tone  # noqa: E402
from dave_peer import DavePeer  # noqa: E402

from telecom import Client, Playable  # noqa: E402
from telecom.dave import DaveSessionManager  # noqa: E402
from telecom.testing import LocalVoiceServer, mls  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dave.json"


def frame_costs(n: int = 20000) -> dict[str, float]:
    ext = mls.ExternalSender()
    sent: list = []
    manager = DaveSessionManager(10, 20, 1, send_json=lambda *a: sent.append(a),
                                 send_binary=lambda *a: sent.append(a), emit=lambda *a, **k: None)
    manager.start()
    manager.users_connected([11])
    manager.handle(25, ext.serialize())
    other = davey.DaveSession(1, 11, 20)
    other.set_external_sender(ext.serialize())
    add = ext.proposal((20).to_bytes(8, "big"), 0, mls.add_proposal(sent[0][1]))
    cw = other.process_proposals(davey.ProposalsOperationType.append,
                                 mls.append_proposals_payload([add.message])[1:])
    other.process_commit(cw.commit)
    manager.handle(30, b"\x00\x01" + cw.welcome)
    opus = bytes(range(120))
    out = {}
    t = time.perf_counter()
    for _ in range(n):
        manager.encrypt(opus)
    out["manager_encrypt_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        other.encrypt_opus(opus)
    out["davey_encrypt_opus_us"] = (time.perf_counter() - t) / n * 1e6
    frames = [other.encrypt_opus(opus) for _ in range(n)]
    t = time.perf_counter()
    for f in frames:
        manager.decrypt(11, f)
    out["manager_decrypt_us"] = (time.perf_counter() - t) / n * 1e6
    return out


def transition_losses(skews: list[float], repeats: int = 2) -> list[dict]:
    server = LocalVoiceServer(dave=True, heartbeat_interval=1.0, session_timeout=10.0,
                              dave_transition_timeout=2.0)
    server.start_background()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    rows = []
    uid = iter(range(9000, 100000))
    try:
        for skew in skews:
            for rep in range(repeats):
                channel = 50000 + len(rows)
                peer = DavePeer.for_credentials(server.create_session(1, channel, next(uid)), server.url)
                run(peer.join())
                user = next(uid)
                creds = server.create_session(1, channel, user)
                client = Client(user, 1, creds.session_id, channel_id=channel)
                client.set_server_info(server.url, creds.token)
                client.wait_ready(10)
                server.wait_for_sync(lambda: client.stats()["epoch"] == 1 and peer.dave.epoch == 1, 10)
                pipe = Playable.from_pcm_pipe()
                pipe.send(stereo_tone(3.0, 440.0))
                pipe.close()
                client.play(pipe)
                time.sleep(1.0)
                server.dave_hooks.announce_delays[peer.user_id] = skew
                third = DavePeer.for_credentials(server.create_session(1, channel, next(uid)), server.url)
                run(third.join())
                pipe.done.result(10)
                time.sleep(0.4)
                frames = peer.audio_from(user)
                rows.append({"skew_ms": skew * 1000, "repeat": rep, "frames": len(frames),
                             "lost": sum(p is None for p in frames),
                             "epoch": peer.dave.epoch, "recoveries": client.stats()["dave_recoveries"]})
                client.close()
                run(peer.close())
                run(third.close())
    finally:
        server.stop_background()
    return rows


def main() -> None:
    costs = frame_costs()
    print("per 120-byte Opus frame:")
    for k, v in costs.items():
        print(f"  {k:24s} {v:7.2f} µs")
    rows = transition_losses([0.0, 0.1, 0.3])
    print("frames of a playing telecom client a peer could not decrypt around one commit:")
    print("  skew(ms)  lost/frames  (≈ skew/20 ms expected)")
    for r in rows:
        print(f"  {r['skew_ms']:8.0f}  {r['lost']:4d}/{r['frames']:<4d}     {r['skew_ms'] / 20:.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"python": platform.python_version(), "davey": davey.__version__,
                                   "frame_costs_us": costs, "transition_losses": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
