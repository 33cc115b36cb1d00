"""The ``telecom`` command line: argparse subcommands.

``emulate`` (the local voice server), ``demo`` (the offline end-to-end demo), ``play`` (join with
credentials from the main gateway and play a file, a URL or PCM from stdin), ``record`` (join and write
what a user says, or everyone, to a file) and ``capi-build`` (build libtelecom.so).

Owns argument parsing and the human-facing output of each subcommand; the work itself lives in the
library (``emulate`` runs :class:`telecom.testing.LocalVoiceServer`, ``play``/``record`` drive a
:class:`telecom.Client`). New subcommands register themselves in :func:`build_parser` with
``subparsers.add_parser`` and a ``func``. Failures print one ``telecom <command>: error: ...`` line and
exit with status 1 (2 for bad arguments or a missing optional dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any, Sequence

DEMO_GUILD = 100000000000000001
DEMO_CHANNEL = 100000000000000002
DEMO_USER = 100000000000000003


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telecom", description="Discord voice for Python bots.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    emulate = subparsers.add_parser(
        "emulate",
        help="run a local voice server (a stand-in for Discord's) until Ctrl-C",
        description=(
            "Run the local voice server on loopback: voice gateway v8 (ws, or wss with --tls), UDP "
            "with IP discovery, both rtpsize AEAD modes and an SFU relay. Prints, for each user, the "
            "credentials a bot would get from Discord's main gateway, then runs until Ctrl-C."
        ),
    )
    emulate.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    emulate.add_argument("--port", type=int, default=0, help="websocket port (default: any free port)")
    emulate.add_argument("--udp-port", type=int, default=0, help="UDP port (default: any free port)")
    emulate.add_argument("--tls", action="store_true", help="serve wss:// with a generated CA")
    emulate.add_argument("--cert-dir", help="where to write the CA and certificate (default: a temp dir)")
    emulate.add_argument("--no-dave", action="store_true",
                         help="do not require DAVE (Identify without max_dave_protocol_version is accepted)")
    emulate.add_argument("--guild", type=int, default=DEMO_GUILD, help="guild id for the sessions")
    emulate.add_argument("--channel", type=int, default=DEMO_CHANNEL,
                         help="voice channel id for the sessions")
    emulate.add_argument("--user", type=int, action="append", dest="users", metavar="USER",
                         help="user id to create a session for (repeat for several; default: one demo user)")
    emulate.add_argument("--heartbeat-interval", type=float, default=13.75, help="seconds (default 13.75)")
    emulate.add_argument("--json", action="store_true",
                         help="also print one JSON line with all the details (for scripts)")
    emulate.set_defaults(func=_emulate)

    demo = subparsers.add_parser(
        "demo", help="the offline demo: local voice server + a bot that plays, and what was heard",
        description="Start the local voice server, join a bot, play tones and a file, print what the "
                    "server heard (python -m telecom.demo; its arguments follow).")
    demo.set_defaults(func=lambda args: _demo([]))

    play = subparsers.add_parser(
        "play", help="join a voice channel and play a file, a URL or PCM from stdin",
        description="Join with the credentials of VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE and play "
                    "FILE_OR_URL (anything FFmpeg reads), or '-': raw PCM from stdin (48 kHz s16le "
                    "stereo). Exits when it has played out.")
    _add_connection_arguments(play)
    play.add_argument("--volume", type=float, default=100.0, help="percent, 0..200 (default 100)")
    play.add_argument("source", metavar="FILE_OR_URL_OR_-", help="a path, an http(s) URL, or - for stdin PCM")
    play.set_defaults(func=_play)

    record = subparsers.add_parser(
        "record", help="join a voice channel and record a user (or everyone) to a file",
        description="Join with the credentials of VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE and write "
                    "what --user-id says (or everyone mixed, with --all) to --out (wav, flac, ogg, opus, "
                    "mp3 by extension) until --seconds have passed or Ctrl-C.")
    _add_connection_arguments(record)
    who = record.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", type=int, help="the user to record")
    who.add_argument("--all", action="store_true", help="everyone in the channel, mixed (the muxer)")
    record.add_argument("--out", required=True, help="the file to write")
    record.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    record.set_defaults(func=_record)

    capi = subparsers.add_parser(
        "capi-build", help="build libtelecom.so + telecom.h (the C ABI)",
        description="Build the C ABI (python -m telecom.capi.build; its arguments follow, e.g. --out DIR); "
                    "needs the capi extra (cffi).")
    capi.set_defaults(func=lambda args: _capi_build([]))

    server = subparsers.add_parser(
        "server", help="run telecom-server, the HTTP/JSON voice node",
        description="Run the HTTP node (python -m telecom.server; its arguments follow, e.g. --password).")
    server.set_defaults(func=lambda args: _server([]))
    return parser


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (from Discord's main gateway)")
    group.add_argument("--endpoint", required=True,
                       help="VOICE_SERVER_UPDATE endpoint (host:port = wss), or a ws:// / wss:// URL")
    group.add_argument("--token", required=True, help="VOICE_SERVER_UPDATE token")
    group.add_argument("--user", type=int, required=True, help="the bot's user id")
    group.add_argument("--guild", type=int, required=True, help="guild id")
    group.add_argument("--session", required=True, help="VOICE_STATE_UPDATE session_id")
    group.add_argument("--channel", type=int, help="voice channel id (needed on DAVE channels)")
    group.add_argument("--ca-file",
                       help="trust this CA (PEM) instead of the system's (e.g. telecom emulate --tls)")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the connection")


def _server(argv: list[str]) -> int:
    from telecom.server import main as server_main

    return server_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These hand their arguments to another module's own parser (its --help included).
    passthrough = {"demo": _demo, "capi-build": _capi_build, "server": _server}
    if argv and argv[0] in passthrough:
        return int(passthrough[argv[0]](argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


# -- emulate ------------------------------------------------------------------------------------


def _emulate(args: argparse.Namespace) -> int:
    try:
        from telecom.testing import LocalVoiceServer
    except ImportError as exc:  # the testing extra is missing
        print(f"telecom emulate needs the testing extra: pip install 'telecom[testing]' ({exc})",
              file=sys.stderr)
        return 2
    server = LocalVoiceServer(
        args.host, args.port, tls=args.tls, udp_port=args.udp_port, dave=not args.no_dave,
        heartbeat_interval=args.heartbeat_interval, cert_dir=args.cert_dir,
    )
    try:
        return asyncio.run(_serve(server, args))
    except KeyboardInterrupt:
        return 0


async def _serve(server: Any, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # e.g. Windows: KeyboardInterrupt ends us instead
            pass
    async with server:
        users = args.users or [DEMO_USER]
        sessions = [server.create_session(args.guild, args.channel, user) for user in users]
        _print_details(server, sessions, args)
        await stop.wait()
        print("\nstopping; what the server saw:", flush=True)
        for creds in sessions:
            record = server.record(creds.user_id)
            violations = server.violations(creds.user_id)
            print(f"  user {creds.user_id}: {len(record.packets)} RTP packets "
                  f"({record.silence_frames} silence), {len(violations)} violations", flush=True)
            for v in violations[:20]:
                print(f"    {v.kind}: {v.detail}", flush=True)
    return 0


def _print_details(server: Any, sessions: list[Any], args: argparse.Namespace) -> None:
    out: list[str] = []
    out.append(f"telecom local voice server on {server.url} (UDP {server.advertised_ip}:{server.udp_port})")
    out.append(f"endpoint: {server.endpoint}")
    out.append(f"DAVE required: {'no' if args.no_dave else 'yes'}")
    if server.ca_file:
        out.append(f"CA file: {server.ca_file}")
    for creds in sessions:
        out.append(
            f"user {creds.user_id}: guild={creds.guild_id} channel={creds.channel_id} "
            f"session_id={creds.session_id} token={creds.token}"
        )
    first = sessions[0]
    # Discord's host:port means wss with verification; for a plain-ws emulator pass the ws:// URL.
    endpoint = server.endpoint if server.tls else server.url
    ssl_arg = f", ssl={server.ca_file!r}" if server.ca_file else ""
    out.append("")
    out.append("connect from Python:")
    out.append("    from telecom import Client")
    out.append(f"    client = Client({first.user_id}, {first.guild_id}, {first.session_id!r}, "
               f"channel_id={first.channel_id}{ssl_arg})")
    out.append(f"    client.set_server_info({endpoint!r}, {first.token!r})")
    out.append("    client.wait_ready(timeout=10)")
    out.append("    client.close()")
    out.append("")
    out.append("running; press Ctrl-C to stop")
    print("\n".join(out), flush=True)
    if args.json:
        print(json.dumps({
            "url": server.url,
            "endpoint": server.endpoint,
            "udp_port": server.udp_port,
            "ca_file": server.ca_file,
            "dave": not args.no_dave,
            "sessions": [
                {"guild_id": c.guild_id, "channel_id": c.channel_id, "user_id": c.user_id,
                 "session_id": c.session_id, "token": c.token}
                for c in sessions
            ],
        }), flush=True)


# -- demo / capi-build ----------------------------------------------------------------------------


def _demo(argv: list[str]) -> int:
    try:
        from telecom import demo
    except ImportError as exc:
        print(f"telecom demo needs the testing extra: pip install 'telecom[testing]' ({exc})",
              file=sys.stderr)
        return 2
    return int(demo.main(argv) or 0)


def _capi_build(argv: list[str]) -> int:
    from telecom.capi import build

    return build.main(argv)


# -- play / record ----------------------------------------------------------------------------


def _fail(command: str, exc: BaseException) -> int:
    print(f"telecom {command}: error: {exc}", file=sys.stderr, flush=True)
    return 1


def _join(args: argparse.Namespace) -> Any:
    from telecom import Client

    client = Client(args.user, args.guild, args.session, channel_id=args.channel, ssl=args.ca_file)
    try:
        client.set_server_info(args.endpoint, args.token)
        client.wait_ready(args.timeout)
    except BaseException:
        client.close()
        raise
    stats = client.stats()
    print(f"joined: ssrc {stats['ssrc']}, mode {stats['mode']}", file=sys.stderr, flush=True)
    return client


def _play(args: argparse.Namespace) -> int:
    from telecom import Playable, TelecomError

    try:
        client = _join(args)
    except TelecomError as exc:
        return _fail("play", exc)
    try:
        client.set_volume(args.volume)
        if args.source == "-":
            playable = Playable.from_pcm_pipe()
            client.play(playable)
            _pump_stdin(playable)
        else:
            factory = _source_factory(args.source)
            if factory is None:
                return _fail("play", TelecomError("this build of telecom cannot play files or URLs "
                                                  "(Playable.from_url/from_file are missing); use - for PCM"))
            playable = client.play(factory(args.source))
        playable.done.result()
        end_reason = getattr(playable, "end_reason", None)
        stats = client.stats()
        print(f"played: {stats['frames_sent']} frames, {stats['underruns']} underruns"
              + (f", ended: {end_reason}" if end_reason else ""), file=sys.stderr, flush=True)
        return 1 if end_reason == "error" else 0
    except KeyboardInterrupt:
        return 130
    except TelecomError as exc:
        return _fail("play", exc)
    finally:
        client.close()


def _source_factory(source: str) -> Any:
    from telecom import Playable

    if "://" in source and not source.lower().startswith("file://"):
        return getattr(Playable, "from_url", None)
    return getattr(Playable, "from_file", None)


def _pump_stdin(pipe: Any, chunk: int = 38400) -> None:
    """Stdin into the pipe, 200 ms at a time, waiting for room (the pipe paces the reader)."""
    stream = sys.stdin.buffer
    while True:
        data = stream.read(chunk)
        if not data:
            break
        pipe.wait_writable(len(data))
        if pipe.state in ("stopped", "ended"):
            return
        pipe.send(data)
    pipe.close()


def _record(args: argparse.Namespace) -> int:
    import time

    from telecom import TelecomError

    try:
        from telecom.output import Output
    except ImportError:
        return _fail("record", TelecomError("this build of telecom has no receive path (telecom.output)"))
    try:
        client = _join(args)
    except TelecomError as exc:
        return _fail("record", exc)
    output = None
    muxer = None
    try:
        output = Output.to_file(args.out)
        if args.all:
            muxer = Output.muxer()
            muxer.set_output(output)
            client.set_output_muxer(muxer)
        else:
            client.get_user(args.user_id).set_output(output)
        print(f"recording {'everyone' if args.all else f'user {args.user_id}'} to {args.out}",
              file=sys.stderr, flush=True)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
        return 0
    except KeyboardInterrupt:
        return 0
    except TelecomError as exc:
        return _fail("record", exc)
    finally:
        if muxer is not None:
            muxer.close()
        if output is not None:
            output.close()
            print(f"wrote {args.out}: {output.samples_written / 48000:.2f} s", file=sys.stderr, flush=True)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
