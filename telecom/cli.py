"""The ``telecom`` command line: argparse subcommands (``telecom emulate`` for now).

Owns argument parsing and the human-facing output of each subcommand; the work itself lives in the
library (``emulate`` runs :class:`telecom.testing.LocalVoiceServer`). New subcommands register
themselves in :func:`build_parser` with ``subparsers.add_parser`` and a ``func``.
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
