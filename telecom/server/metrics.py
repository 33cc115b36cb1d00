"""``/metrics``: the node's figures in Prometheus' text exposition format (version 0.0.4), by hand.

What it owns: metric names, help texts and label escaping. What it must not do: collect anything
itself — it reads :meth:`telecom.server.app.Node.stats` and the request counters the app keeps.
"""

from __future__ import annotations

from typing import Any


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {float(value):.17g}")

    def histogram(self, name: str, help_text: str,
                  series: list[tuple[dict, list[tuple[float, int]], float, int]]) -> None:
        """``series``: (labels, cumulative [(upper edge, count)] ending at +Inf, sum, count)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, buckets, total, count in series:
            for edge, cumulative in buckets:
                le = "+Inf" if edge == float("inf") else f"{edge:g}"
                self.lines.append(f"{name}_bucket{_labels(dict(labels, le=le))} {cumulative}")
            self.lines.append(f"{name}_sum{_labels(labels)} {float(total):.9f}")
            self.lines.append(f"{name}_count{_labels(labels)} {count}")


def render(node: Any) -> str:
    s = node.stats()
    w = _Writer()
    w.metric("telecom_sessions", "gauge", "Websocket sessions (attached or waiting to resume).",
             [({}, s["sessions"])])
    w.metric("telecom_players", "gauge", "Voice connections held by this node.", [({}, s["players"])])
    w.metric("telecom_players_playing", "gauge", "Voice connections with at least one playing track.",
             [({}, s["playing_players"])])
    w.metric("telecom_tracks_playing", "gauge", "Tracks playing.", [({}, s["playing_tracks"])])
    frames = s["frames"]
    w.metric("telecom_frames_sent_total", "counter", "Opus audio frames sent.", [({}, frames["sent"])])
    w.metric("telecom_frames_late_total", "counter", "Frames sent more than 5 ms after their deadline.",
             [({}, frames["late"])])
    w.metric("telecom_frames_deficit_total", "counter",
             "20 ms ticks at which a playing track had no audio ready (underruns).", [({}, frames["deficit"])])
    w.metric("telecom_frames_skipped_total", "counter", "Frames skipped because a tick ran too late.",
             [({}, frames["skipped"])])
    w.metric("telecom_events_sent_total", "counter", "Websocket messages sent.", [({}, node.events_sent)])
    w.metric("telecom_process_cpu_load", "gauge", "Process CPU time per wall second per core (0..1).",
             [({}, s["cpu"]["process_load"])])
    w.metric("telecom_process_resident_memory_bytes", "gauge", "Resident memory.", [({}, s["memory"]["rss"])])
    w.metric("telecom_uptime_seconds", "gauge", "Seconds since the node started.", [({}, s["uptime"])])
    w.metric("telecom_http_requests_total", "counter", "HTTP requests answered, by route and status.",
             [({"method": m, "route": r, "status": st}, n) for (m, r, st), n in sorted(node.http_counts.items())])
    from telecom.server.app import HTTP_BUCKETS

    series = []
    for (m, r), (n, total, counts) in sorted(node.http_seconds.items()):
        running, cumulative = 0, []
        for edge, count in zip(HTTP_BUCKETS, counts):
            running += count
            cumulative.append((edge, running))
        series.append(({"method": m, "route": r}, cumulative, total, n))
    w.histogram("telecom_http_request_duration_seconds", "Time to answer HTTP requests.", series)
    lateness = node.send_lateness()
    cumulative = [(float("inf") if edge is None else edge, count) for edge, count in lateness["buckets"]]
    w.histogram("telecom_send_lateness_seconds",
                "How long after its 20 ms deadline each packet left (media threads).",
                [({}, cumulative, lateness["sum"], lateness["count"])])
    w.metric("telecom_frames_worked_ahead_total", "counter",
             "Frames the media threads prepared a tick before their deadline (work ahead).",
             [({}, lateness["ahead"])])
    w.metric("telecom_connections_moved_total", "counter",
             "Running connections a busier media thread handed over to a less loaded one (rebalancing).",
             [({}, lateness["moved"])])
    return "\n".join(w.lines) + "\n"
