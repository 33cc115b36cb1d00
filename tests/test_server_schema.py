"""schemathesis against the node's /openapi.json: generated requests for every route get no 5xx and
answers that conform to the documented schemas, status codes and content types. Outgoing traffic
stays on loopback: generated voice endpoints and track URLs are pointed at the local voice server and
a loopback media server before the request is sent."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from media import MediaServer  # noqa: E402
from test_server import NodeProcess, WsSession  # noqa: E402

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def schema_env(voice_server):
    with tempfile.TemporaryDirectory() as tmp, MediaServer({"a.wav": b"RIFF0000"}) as media:
        node = NodeProcess(tmp, "--allow", "127.0.0.1/32")
        ws = WsSession(node, user_id=4242)
        try:
            yield node, ws, media, voice_server
        finally:
            ws.close()
            node.stop()


def _keep_on_loopback(case, ws, media, voice_server) -> None:
    if "sid" in (case.path_parameters or {}):
        case.path_parameters["sid"] = ws.session_id      # reach the real handlers, not only the 404s
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return
    voice = body.get("voice")
    if isinstance(voice, dict) and "endpoint" in voice:
        voice["endpoint"] = voice_server.url
    targets = [body] + ([body["track"]] if isinstance(body.get("track"), dict) else [])
    for target in targets:
        if "url" in target:
            target["url"] = media.url("/f/a.wav")


def test_api_conforms_to_its_schema(schema_env):
    """Every operation, MAX_EXAMPLES generated cases each (schemathesis' own checks: no server error,
    status code, content type and response body as documented)."""
    from hypothesis import given

    node, ws, media, voice_server = schema_env
    schema = schemathesis.openapi.from_url(node.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    tested = []
    for operation in operations:
        if operation.path == "/v1/websocket":
            continue   # a websocket upgrade: exercised in test_server.py

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case):
            _keep_on_loopback(case, ws, media, voice_server)
            # positive_data_acceptance is left out: a schema-valid request can still be refused on
            # purpose (a URL the policy denies, a file that is not there, a seek past the end): 422/404.
            case.call_and_validate(base_url=node.url, headers={"Authorization": node.password},
                                   excluded_checks=[schemathesis.checks.positive_data_acceptance])

        run()
        tested.append(operation.label)
    print(f"schemathesis: {len(tested)} operations x {MAX_EXAMPLES} examples")
    status, metrics = node.request("GET", "/metrics")
    counts = [line for line in metrics.decode().splitlines() if line.startswith("telecom_http_requests_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= len(tested) * 2
    assert not [line for line in counts if 'status="5' in line], counts
