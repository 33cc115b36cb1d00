"""The node's configuration: defaults, then a file (TOML or JSON), then ``TELECOM_SERVER_*`` environment
variables, then command-line flags — each later source overrides the earlier ones.

What it owns: the option names, their types and ranges, and the refusal to start without a password
unless ``no_auth`` is set explicitly. What it must not do: open sockets or touch the filesystem beyond
reading the config file.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from telecom.errors import ConfigurationError

ENV_PREFIX = "TELECOM_SERVER_"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 2333
    password: str | None = None
    no_auth: bool = False
    recordings_dir: str = "recordings"
    media_root: str | None = None
    allow: list[str] = field(default_factory=list)       # URL policy: hosts / CIDRs
    deny: list[str] = field(default_factory=list)
    allow_private: bool = False
    resume_timeout: float = 60.0        # default for sessions that enable resuming
    event_buffer: int = 1000            # events kept per detached session
    stats_interval: float = 5.0         # seconds between websocket stats messages
    max_body: int = 64 * 1024           # request body limit (bytes)
    max_players: int = 1000             # per node
    media_threads: int | None = None
    realtime_priority: int = 0          # media threads at SCHED_FIFO (1..99); 0: off
    work_ahead: bool = True             # media threads prepare frames a tick early (engine.configure)
    rebalance: bool = True              # a busier media thread hands running connections over

    def check(self) -> "ServerConfig":
        if not self.no_auth and not self.password:
            raise ConfigurationError("the node needs a password (--password / TELECOM_SERVER_PASSWORD) "
                                     "unless authentication is disabled explicitly with --no-auth")
        if not 0 <= int(self.port) < 65536:
            raise ConfigurationError(f"port {self.port} out of range")
        if not 0 < float(self.resume_timeout) <= 86400:
            raise ConfigurationError("resume_timeout must be in (0, 86400] seconds")
        if not 0.1 <= float(self.stats_interval) <= 3600:
            raise ConfigurationError("stats_interval must be in [0.1, 3600] seconds")
        if not 1024 <= int(self.max_body) <= 16 * 1024 * 1024:
            raise ConfigurationError("max_body must be in [1 KiB, 16 MiB]")
        if not 0 <= int(self.realtime_priority) <= 99:
            raise ConfigurationError("realtime_priority must be 0 (off) or 1..99")
        if self.media_root is not None and not os.path.isdir(self.media_root):
            raise ConfigurationError(f"media root {self.media_root!r} is not a directory")
        return self


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(ServerConfig)}
    kind = str(kinds[name])
    try:
        if "list" in kind:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if "bool" in kind:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if value is None:
            return None
        if "int" in kind and "str" not in kind:
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"bad value for {name}: {value!r}") from None


def load_file(path: str) -> dict:
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".json"):
        raw = json.loads(data)
    else:
        import tomllib

        raw = tomllib.loads(data.decode())
        raw = raw.get("server", raw)
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: expected a table/object of options")
    return raw


def build_config(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    names = {f.name for f in fields(ServerConfig)}
    config_file = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        for key, value in load_file(config_file).items():
            key = key.replace("-", "_")
            if key not in names:
                raise ConfigurationError(f"{config_file}: unknown option {key!r}")
            values[key] = _coerce(key, value)
    for name in names:
        if ENV_PREFIX + name.upper() in env:
            values[name] = _coerce(name, env[ENV_PREFIX + name.upper()])
    if args is not None:
        for name in names:
            value = getattr(args, name, None)
            if value is not None and value != [] and value is not False:
                values[name] = _coerce(name, value)
    return ServerConfig(**values).check()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML ([server] table) or JSON file of options")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 2333; 0: any free port)")
    parser.add_argument("--password", help="the Authorization header clients must send")
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a password")
    parser.add_argument("--recordings-dir", help="where recordings are written (default ./recordings)")
    parser.add_argument("--media-root", help="local files may be played from this directory only")
    parser.add_argument("--allow", action="append", help="URL policy: allow a host or CIDR (repeatable)")
    parser.add_argument("--deny", action="append", help="URL policy: deny a host or CIDR (repeatable)")
    parser.add_argument("--allow-private", action="store_true",
                        help="let from_url fetch private/loopback/link-local addresses (tests only)")
    parser.add_argument("--resume-timeout", type=float, help="default session resume timeout, seconds")
    parser.add_argument("--stats-interval", type=float, help="seconds between websocket stats (default 5)")
    parser.add_argument("--max-body", type=int, help="request body limit in bytes (default 65536)")
    parser.add_argument("--max-players", type=int, help="voice connections per node (default 1000)")
    parser.add_argument("--media-threads", type=int, help="telecom media threads (default: CPUs)")
    parser.add_argument("--realtime-priority", type=int,
                        help="run the media threads at SCHED_FIFO with this priority (1..99; needs "
                             "CAP_SYS_NICE; default 0: off)")
    parser.add_argument("--work-ahead", choices=["on", "off"],
                        help="media threads prepare each frame up to a tick early (default on; off: "
                             "pause/volume/seek act 20 ms sooner, stalls cost more late frames)")
    parser.add_argument("--rebalance", choices=["on", "off"],
                        help="a media thread carrying clearly more load than another hands it running "
                             "connections (default on; off: connections stay where they were placed)")
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)  # tests: the bound port is written here


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="telecom-server",
                                     description="telecom's HTTP/JSON voice node (Lavalink v4-like API).")
    add_arguments(parser)
    return parser.parse_args(argv)
