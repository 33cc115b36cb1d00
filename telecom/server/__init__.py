"""telecom-server: an HTTP/JSON node (Lavalink v4-like sessions and players, plus recordings) over
:class:`telecom.Client`. Run it with ``telecom-server`` / ``python -m telecom.server`` / ``telecom server``.

What this package owns: the aiohttp.web app (:mod:`.app`), its configuration (:mod:`.config`), the URL and
file policy (:mod:`.security`), ``/metrics`` (:mod:`.metrics`) and ``/openapi.json`` (:mod:`.openapi`).
It must not be imported by the core library: ``telecom`` never depends on it.
"""

from __future__ import annotations

from telecom.server.config import ServerConfig, build_config
from telecom.server.security import MediaRoot, UrlPolicy, UrlRefused

__all__ = ["MediaRoot", "ServerConfig", "UrlPolicy", "UrlRefused", "build_config", "main", "run"]


def run(config: ServerConfig, ready_file: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocks; the app's loop is this thread's)."""
    import asyncio
    import signal

    from telecom.server.app import start_node

    async def serve() -> None:
        _node, runner, port = await start_node(config)
        print(f"telecom-server: listening on http://{config.host}:{port}/v1", flush=True)
        if ready_file:
            with open(ready_file + ".tmp", "w") as fh:
                fh.write(str(port))
            import os

            os.replace(ready_file + ".tmp", ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    import logging
    import sys

    from telecom.errors import ConfigurationError
    from telecom.server.config import parse_args

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = build_config(args)
    except ConfigurationError as exc:
        print(f"telecom-server: error: {exc}", file=sys.stderr)
        return 2
    run(config, args.ready_file)
    return 0
