"""The node's security policy: which URLs it may fetch (SSRF) and which local files it may play.

What it owns: :class:`UrlPolicy` — allow/deny lists of hosts and CIDRs, with private, loopback,
link-local, multicast and reserved ranges denied by default — checked on the *resolved* addresses before
a fetch starts, on every redirect hop (plugged into :class:`telecom.sources.http.HttpFile`'s
``redirect_check``) and on the address each TCP connection actually reached (``connect_check``, so a DNS
answer that changes between the check and the connect cannot slip through); :class:`MediaRoot` — local
paths resolved inside one directory (``..``, absolute paths and symlinks out of it refused).

What it must not do: fetch anything itself, or trust a hostname's spelling: every decision is taken on
IP addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import urllib.parse
from typing import Any, Iterable

from telecom.errors import ConfigurationError, SourceError
from telecom.sources.http import default_redirect_check

log = logging.getLogger("telecom.server")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(SourceError):
    """The node's URL policy refused a URL, a redirect hop or a resolved address."""


def _parse_entries(entries: Iterable[str]) -> tuple[list[Network], set[str]]:
    nets: list[Network] = []
    hosts: set[str] = set()
    for raw in entries:
        entry = str(raw).strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if not all(part.isalnum() or part == "-" or part == "*" for part in entry.replace(".", " ").split()):
                raise ConfigurationError(f"not a host name or CIDR: {entry!r}") from None
            hosts.add(entry.lower().rstrip("."))
    return nets, hosts


def _host_matches(host: str, patterns: set[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) or host == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def is_private(address: Address) -> bool:
    """Anything that is not a public unicast address: private, loopback, link-local, CGNAT, multicast..."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified or not address.is_global)


class UrlPolicy:
    """Which URLs ``from_url`` may fetch on this node.

    ``allow``/``deny``: host names (``example.com``, ``*.example.com``) and CIDRs (``10.0.0.0/8``).
    A URL is refused when its host name or any resolved address is denied; with a non-empty host-name
    allow list the host must be on it; an address in a non-public range needs ``allow_private`` or an
    allow-list CIDR that contains it. Deny always wins.
    """

    def __init__(self, *, allow: Iterable[str] = (), deny: Iterable[str] = (), allow_private: bool = False,
                 resolver: Any = None) -> None:
        self.allow_nets, self.allow_hosts = _parse_entries(allow)
        self.deny_nets, self.deny_hosts = _parse_entries(deny)
        self.allow_private = bool(allow_private)
        self._resolve = resolver or _resolve

    def describe(self) -> dict:
        return {"allow": sorted(self.allow_hosts) + [str(n) for n in self.allow_nets],
                "deny": sorted(self.deny_hosts) + [str(n) for n in self.deny_nets],
                "allow_private": self.allow_private}

    def check_address(self, address: Any, host: str = "", host_allowed: bool | None = None) -> None:
        """Refuse ``address`` (reached for ``host``) unless the policy lets it through."""
        try:
            ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        except ValueError:
            raise UrlRefused(f"not an IP address: {address!r}") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        label = f"{host} ({ip})" if host and host != str(ip) else str(ip)
        if any(ip in net for net in self.deny_nets if net.version == ip.version):
            raise UrlRefused(f"{label} is on the node's deny list")
        allowed_net = any(ip in net for net in self.allow_nets if net.version == ip.version)
        if is_private(ip) and not (self.allow_private or allowed_net):
            raise UrlRefused(f"{label} is a private/loopback/link-local address; the node refuses it "
                             "(allow it with --allow-private or an allow-list CIDR)")
        if host_allowed is None:
            host_allowed = bool(host) and _host_matches(host, self.allow_hosts)
        if (self.allow_nets or self.allow_hosts) and not (allowed_net or host_allowed):
            raise UrlRefused(f"{label} is not on the node's allow list")

    def check_url(self, url: str) -> list[str]:
        """Refuse the URL unless its scheme, host and every resolved address pass; returns the addresses."""
        if not isinstance(url, str) or len(url) > 4096:
            raise UrlRefused("url must be a string of at most 4096 characters")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise UrlRefused(f"only http and https URLs can be fetched, not {url!r}")
        host = parts.hostname
        if not host:
            raise UrlRefused(f"no host in URL {url!r}")
        if _host_matches(host, self.deny_hosts):
            raise UrlRefused(f"host {host} is on the node's deny list")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise UrlRefused(f"bad port in URL {url!r}") from None
        addresses = self._resolve(host, port)
        if not addresses:
            raise UrlRefused(f"{host} does not resolve")
        for address in addresses:
            self.check_address(address, host)
        return addresses

    # -- hooks for telecom.sources.http.HttpFile -------------------------------------------------------
    def redirect_check(self, old: str, new: str) -> None:
        default_redirect_check(old, new)
        try:
            self.check_url(new)
        except UrlRefused as exc:
            raise UrlRefused(f"redirect from {old} refused: {exc}") from None

    def connect_check(self, url: str, peer: Any) -> None:
        host = urllib.parse.urlsplit(url).hostname or ""
        self.check_address(peer[0] if isinstance(peer, tuple) else peer, host)


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlRefused(f"cannot resolve {host}: {exc}") from None
    return sorted({info[4][0] for info in infos})


class MediaRoot:
    """Local files the node may play: only paths inside ``root`` (after resolving symlinks)."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = os.path.realpath(os.fspath(root)) if root else None

    def resolve(self, name: Any) -> str:
        if self.root is None:
            raise UrlRefused("this node has no media root: local files cannot be played (--media-root)")
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
            raise ConfigurationError("file must be a non-empty relative path string")
        if os.path.isabs(name) or name.startswith("~"):
            raise UrlRefused(f"file {name!r} must be relative to the media root")
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, self.root]) != self.root:
            raise UrlRefused(f"file {name!r} is outside the media root")
        return path


def safe_child(directory: str, name: Any) -> str:
    """``directory/name`` for a plain file name (no separators, no dot files): for recordings."""
    if (not isinstance(name, str) or not name or len(name) > 200 or "/" in name or "\\" in name
            or name.startswith(".") or "\x00" in name):
        raise ConfigurationError(f"bad file name {name!r}")
    return os.path.join(directory, name)
