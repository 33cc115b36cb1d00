"""The C functions of libtelecom.so, implemented over telecom's Python API (runs embedded).

What it owns: handles (integers disguised as opaque pointers, so a stale or foreign handle is an
error and never a crash), the mapping from telecom's exceptions to ``TELECOM_E_*`` status codes with a
message for ``telecom_last_error()``, per-client event queues for ``client_poll_event`` and the C event
callback.

What it must not do: let an exception escape into C (every function catches everything and returns a
status), or block the io thread (callbacks into C run there: the header tells C users to be quick).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import weakref
from typing import Any, Callable

log = logging.getLogger("telecom.capi")

TELECOM_OK = 0
TELECOM_E_INVALID = -1
TELECOM_E_TIMEOUT = -2
TELECOM_E_FULL = -3
TELECOM_E_CLOSED = -4
TELECOM_E_UNSUPPORTED = -5
TELECOM_E_CONNECTION = -6
TELECOM_E_INIT = -7
TELECOM_E_IO = -8
TELECOM_E_EMPTY = -9
TELECOM_E_INTERNAL = -10

EVENT_QUEUE_SIZE = 1024
NAME_MAX = 32
JSON_MAX = 1024


class CApiError(Exception):
    """A failure with an explicit status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_of(exc: BaseException) -> int:
    """The status code C sees for a Python exception."""
    from telecom import errors

    if isinstance(exc, CApiError):
        return exc.status
    if isinstance(exc, errors.BufferFull):
        return TELECOM_E_FULL
    if isinstance(exc, errors.ClientClosed):
        return TELECOM_E_CLOSED
    if isinstance(exc, (errors.ConnectTimeout, TimeoutError)):
        return TELECOM_E_TIMEOUT
    if isinstance(exc, errors.GatewayError):
        return TELECOM_E_CONNECTION
    if isinstance(exc, NotImplementedError):
        return TELECOM_E_UNSUPPORTED
    if isinstance(exc, (ValueError, TypeError, UnicodeDecodeError)):
        return TELECOM_E_INVALID
    if isinstance(exc, OSError):
        return TELECOM_E_IO
    if isinstance(exc, ConnectionError):
        return TELECOM_E_CONNECTION
    return TELECOM_E_INTERNAL


class Handles:
    """Live objects by handle number. Numbers are never reused, so a destroyed handle stays invalid."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._next = 1
        self._objects: dict[int, Any] = {}

    def add(self, obj: Any) -> int:
        with self._lock:
            number = self._next
            self._next += 1
            self._objects[number] = obj
            return number

    def get(self, number: int) -> Any:
        obj = self._objects.get(number)
        if obj is None:
            what = "NULL" if number == 0 else f"{number:#x}"
            raise CApiError(TELECOM_E_INVALID,
                            f"{what} is not a live {self.kind} handle (destroyed, or never created)")
        return obj

    def pop(self, number: int) -> Any:
        with self._lock:
            return self._objects.pop(number, None)

    def live(self) -> list[Any]:
        with self._lock:
            return list(self._objects.values())


class CClient:
    """A Client plus what the C side needs: its event queue and callback."""

    def __init__(self, client: Any, api: "Api") -> None:
        self.client = client
        self.api = api
        self.events: collections.deque = collections.deque()
        self.dropped = 0
        self.cond = threading.Condition()
        self.callback: Any = None
        self.userdata: Any = None
        # Held while the C callback runs: replacing or removing it (or destroying the client) waits for
        # a running call, so C may free the callback's userdata as soon as that returns.
        self.callback_lock = threading.RLock()
        self.muxer: Any = None  # the muxer of client_set_muxer_file, closed when replaced
        client.on("*", self._on_event)

    def _on_event(self, event: Any) -> None:
        item = self.api.event_payload(event)
        # The callback first: an event a poller can see has already been through the callback.
        with self.callback_lock:
            callback = self.callback
            if callback is not None:
                out = self.api.ffi.new("telecom_event *")
                self.api.fill_event(out, item)
                try:
                    callback(out, self.userdata)
                except Exception:  # noqa: BLE001 - a C callback cannot raise; log just in case
                    log.exception("C event callback failed")
        with self.cond:
            if len(self.events) >= EVENT_QUEUE_SIZE:
                self.events.popleft()
                self.dropped += 1
            self.events.append(item)
            self.cond.notify_all()


class Api:
    """The implementation of each exported function (``install`` attaches them to CFFI)."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        import telecom

        self.ffi = ffi
        self.lib = lib
        self.clients = Handles("telecom_client")
        self.playables = Handles("telecom_playable")
        # Playable -> handle number, for events; weak so a destroyed, collected playable leaves nothing.
        self._playable_numbers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._version = ffi.new("char[]", telecom.__version__.encode())

    # -- helpers --------------------------------------------------------------------------------------
    def number(self, pointer: Any) -> int:
        return int(self.ffi.cast("uintptr_t", pointer))

    def client(self, pointer: Any) -> CClient:
        return self.clients.get(self.number(pointer))

    def playable(self, pointer: Any) -> Any:
        return self.playables.get(self.number(pointer))

    def text(self, pointer: Any, what: str, *, optional: bool = False) -> str | None:
        if pointer == self.ffi.NULL:
            if optional:
                return None
            raise CApiError(TELECOM_E_INVALID, f"{what} must not be NULL")
        try:
            return self.ffi.string(pointer).decode("utf-8")
        except UnicodeDecodeError:
            raise CApiError(TELECOM_E_INVALID, f"{what} is not valid UTF-8") from None

    def new_playable(self, playable: Any) -> Any:
        number = self.playables.add(playable)
        self._playable_numbers[playable] = number
        return self.ffi.cast("telecom_playable *", number)

    def event_payload(self, event: Any) -> tuple[str, str, int]:
        data: dict[str, Any] = {}
        for key, value in event.data.items():
            if key == "playable":
                data["playable"] = self._playable_numbers.get(value, 0)
                data["state"] = getattr(value, "state", None)
            elif isinstance(value, BaseException):
                data[key] = str(value)
                data["status"] = status_of(value)
            elif isinstance(value, (str, int, float, bool)) or value is None:
                data[key] = value
            else:
                data[key] = repr(value)
        user_id = data.get("user_id") or 0
        return event.name, json.dumps(data, separators=(",", ":")), int(user_id)

    def fill_event(self, out: Any, item: tuple[str, str, int]) -> None:
        name, payload, user_id = item
        raw_name = name.encode()[: NAME_MAX - 1]
        raw = payload.encode()
        out.truncated = int(len(raw) >= JSON_MAX)
        raw = raw[: JSON_MAX - 1]
        self.ffi.memmove(out.name, raw_name + b"\0", len(raw_name) + 1)
        self.ffi.memmove(out.json, raw + b"\0", len(raw) + 1)
        out.user_id = user_id

    # -- the exported functions -------------------------------------------------------------------
    def telecom_version(self) -> Any:
        return self._version

    def create_client(self, user_id: int, guild_id: int, session_id: Any) -> Any:
        return self.create_client_with_channel(user_id, guild_id, session_id, 0)

    def create_client_with_channel(self, user_id: int, guild_id: int, session_id: Any,
                                   channel_id: int) -> Any:
        from telecom import Client

        client = Client(user_id, guild_id, self.text(session_id, "session_id"),
                        channel_id=channel_id or None)
        return self.ffi.cast("telecom_client *", self.clients.add(CClient(client, self)))

    def client_set_channel_id(self, c: Any, channel_id: int) -> int:
        from telecom.client import _snowflake

        client = self.client(c).client
        client._check_open()
        client.channel_id = _snowflake(channel_id, "channel_id")
        return TELECOM_OK

    def client_set_server_info(self, c: Any, endpoint: Any, token: Any) -> int:
        return self.client_set_server_info_ex(c, endpoint, token, self.ffi.NULL)

    def client_set_server_info_ex(self, c: Any, endpoint: Any, token: Any, ca_file: Any) -> int:
        client = self.client(c).client
        ca = self.text(ca_file, "ca_file", optional=True)
        end = self.text(endpoint, "endpoint", optional=True)
        tok = self.text(token, "token", optional=end is None)
        if ca is not None:
            import os

            if not os.path.isfile(ca):
                raise CApiError(TELECOM_E_IO, f"ca_file {ca!r} does not exist")
        client.set_server_info(end, tok, ssl=ca)
        return TELECOM_OK

    def client_wait_ready(self, c: Any, timeout_ms: int) -> int:
        self.client(c).client.wait_ready(None if timeout_ms < 0 else timeout_ms / 1000.0)
        return TELECOM_OK

    def client_play(self, c: Any, p: Any) -> int:
        self.client(c).client.play(self.playable(p))
        return TELECOM_OK

    def client_stop(self, c: Any) -> int:
        self.client(c).client.stop()
        return TELECOM_OK

    def client_set_volume(self, c: Any, percent: float) -> int:
        self.client(c).client.set_volume(percent)
        return TELECOM_OK

    def client_poll_event(self, c: Any, out: Any) -> int:
        return self.client_wait_event(c, out, 0)

    def client_wait_event(self, c: Any, out: Any, timeout_ms: int) -> int:
        cc = self.client(c)
        if out == self.ffi.NULL:
            raise CApiError(TELECOM_E_INVALID, "out must not be NULL")
        with cc.cond:
            if not cc.events and timeout_ms != 0:
                cc.cond.wait_for(lambda: cc.events, None if timeout_ms < 0 else timeout_ms / 1000.0)
            if not cc.events:
                if timeout_ms == 0:
                    raise CApiError(TELECOM_E_EMPTY, "no event is waiting")
                raise CApiError(TELECOM_E_TIMEOUT, f"no event within {timeout_ms} ms")
            item = cc.events.popleft()
        self.fill_event(out, item)
        return TELECOM_OK

    def client_set_event_callback(self, c: Any, callback: Any, userdata: Any) -> int:
        cc = self.client(c)
        with cc.callback_lock:
            cc.userdata = userdata
            cc.callback = None if callback == self.ffi.NULL else callback
        return TELECOM_OK

    def client_stats_json(self, c: Any, buf: Any, capacity: int) -> int:
        cc = self.client(c)
        stats = cc.client.stats()
        stats["events_dropped_c"] = cc.dropped
        raw = json.dumps(stats, default=str, separators=(",", ":")).encode()
        if buf != self.ffi.NULL and capacity > 0:
            part = raw[: capacity - 1]
            self.ffi.memmove(buf, part + b"\0", len(part) + 1)
        return len(raw)

    def user_set_output_file(self, c: Any, user_id: int, path: Any) -> int:
        client = self.client(c).client
        target = self.text(path, "path", optional=True)
        output_cls = _receive_api()
        user = client.get_user(user_id)
        previous = user.output
        user.set_output(None if target is None else output_cls.to_file(target))
        if previous is not None:
            previous.close()  # finalises the file: it is complete when this call returns
        return TELECOM_OK

    def client_set_muxer_file(self, c: Any, path: Any) -> int:
        cc = self.client(c)
        client = cc.client
        target = self.text(path, "path", optional=True)
        output_cls = _receive_api()
        if not hasattr(client, "set_output_muxer") or not hasattr(output_cls, "muxer"):
            raise CApiError(TELECOM_E_UNSUPPORTED, "this build of telecom has no muxer "
                                                   "(Output.muxer / Client.set_output_muxer)")
        muxer = None
        if target is not None:
            muxer = output_cls.muxer()
            muxer.set_output(output_cls.to_file(target))
        client.set_output_muxer(muxer)
        previous, cc.muxer = cc.muxer, muxer
        if previous is not None:
            previous.close()
        return TELECOM_OK

    def client_destroy(self, c: Any) -> None:
        cc = self.clients.pop(self.number(c))
        if cc is None:
            raise CApiError(TELECOM_E_INVALID, f"{self.number(c):#x} is not a live telecom_client handle")
        with cc.callback_lock:
            cc.callback = None
        cc.client.close()

    def create_playable_from_url(self, url: Any) -> Any:
        target = self.text(url, "url")
        scheme = target.split("://", 1)[0].lower() if "://" in target else ""
        if scheme in ("", "file"):
            return self.create_playable_from_file(url)
        return self.new_playable(_source_factory("from_url")(target))

    def create_playable_from_file(self, path: Any) -> Any:
        target = self.text(path, "path")
        if target.lower().startswith("file://"):
            from urllib.parse import unquote, urlparse

            target = unquote(urlparse(target).path)
        return self.new_playable(_source_factory("from_file")(target))

    def create_playable_from_pcm_pipe(self) -> Any:
        return self.create_playable_from_pcm_pipe_ex(10000)

    def create_playable_from_pcm_pipe_ex(self, buffer_ms: int) -> Any:
        from telecom import Playable

        return self.new_playable(Playable.from_pcm_pipe(buffer_seconds=buffer_ms / 1000.0))

    def create_playable_from_opus_pipe(self, buffer_ms: int) -> Any:
        factory = _source_factory("from_opus_pipe", "Opus passthrough")
        return self.new_playable(factory(buffer_seconds=(buffer_ms or 10000) / 1000.0))

    def playable_opus_send(self, p: Any, packet: Any, length: int) -> int:
        pipe = self.playable(p)
        if type(pipe).__name__ != "OpusPipe":  # by name: older builds have no OpusPipe class
            raise CApiError(TELECOM_E_INVALID, "this playable is not an Opus pipe")
        if packet == self.ffi.NULL:
            raise CApiError(TELECOM_E_INVALID, "packet must not be NULL")
        if pipe.state in ("stopped", "ended"):
            raise CApiError(TELECOM_E_CLOSED, f"the pipe has {pipe.state}")
        pipe.send(self.ffi.unpack(self.ffi.cast("char *", packet), length))
        return TELECOM_OK

    def _pipe(self, p: Any) -> Any:
        from telecom import PcmPipe

        pipe = self.playable(p)
        if not isinstance(pipe, PcmPipe):
            raise CApiError(TELECOM_E_INVALID, "this playable is not a PCM pipe")
        return pipe

    def playable_pipe_send(self, p: Any, data: Any, length: int) -> int:
        pipe = self._pipe(p)
        if length and data == self.ffi.NULL:
            raise CApiError(TELECOM_E_INVALID, "data must not be NULL")
        if pipe.state in ("stopped", "ended"):
            raise CApiError(TELECOM_E_CLOSED, f"the pipe has {pipe.state}")
        if length:
            pipe.send(self.ffi.buffer(data, length))
        return TELECOM_OK

    def playable_pipe_send_wait(self, p: Any, data: Any, length: int, timeout_ms: int) -> int:
        pipe = self._pipe(p)
        if length > pipe.capacity:
            raise CApiError(TELECOM_E_INVALID, f"{length} bytes can never fit a {pipe.capacity}-byte pipe")
        pipe.wait_writable(length, None if timeout_ms < 0 else timeout_ms / 1000.0)
        return self.playable_pipe_send(p, data, length)

    def playable_pipe_close(self, p: Any) -> int:
        from telecom import playable as playable_module

        pipe = self.playable(p)
        kinds = tuple(k for k in (getattr(playable_module, "PcmPipe", None),
                                  getattr(playable_module, "OpusPipe", None)) if k is not None)
        if not isinstance(pipe, kinds):
            raise CApiError(TELECOM_E_INVALID, "this playable is not a PCM or Opus pipe")
        pipe.close()
        return TELECOM_OK

    def playable_pause(self, p: Any) -> int:
        self.playable(p).pause()
        return TELECOM_OK

    def playable_resume(self, p: Any) -> int:
        self.playable(p).resume()
        return TELECOM_OK

    def playable_stop(self, p: Any) -> int:
        self.playable(p).stop()
        return TELECOM_OK

    def playable_set_volume(self, p: Any, percent: float) -> int:
        self.playable(p).set_volume(percent)
        return TELECOM_OK

    def playable_wait_done(self, p: Any, timeout_ms: int) -> int:
        import concurrent.futures

        playable = self.playable(p)
        try:
            playable.done.result(None if timeout_ms < 0 else timeout_ms / 1000.0)
        except concurrent.futures.TimeoutError:
            raise CApiError(TELECOM_E_TIMEOUT,
                            f"the playable did not end within {timeout_ms} ms "
                            f"(state {playable.state})") from None
        return TELECOM_OK

    def playable_destroy(self, p: Any) -> None:
        number = self.number(p)
        playable = self.playables.pop(number)
        if playable is None:
            raise CApiError(TELECOM_E_INVALID, f"{number:#x} is not a live telecom_playable handle")
        if playable.state not in ("stopped", "ended"):
            playable.stop()


EXIT_GRACE = 2.0  # seconds the exit hook waits for decode threads (telecom.client's hook adds ≤ 2 s)


def _at_exit(api: Api) -> None:
    """The C host is exiting (a C atexit handler calls this; the GIL stays taken afterwards, so nothing
    Python runs again). Stop the playables the host left, and wait — at most EXIT_GRACE — for decode
    threads to leave PyAV (a thread still loading a library while exit() unloads libraries corrupts
    the heap); run Python's exit functions, which the embedded interpreter would otherwise never run
    (telecom.client's closes every client and waits for its leave handshake, telecom.output's closes
    recordings); stop the native media and receive threads. Never raises: it runs inside exit()."""
    import atexit
    import time

    deadline = time.monotonic() + EXIT_GRACE
    try:
        for playable in api.playables.live():
            if playable.state not in ("stopped", "ended"):
                playable.stop()
        try:
            from telecom.sources.decode import get_pool
        except ImportError:
            get_pool = None  # type: ignore[assignment]
        while get_pool is not None and get_pool().running and time.monotonic() < deadline:
            time.sleep(0.01)
    except BaseException:  # noqa: BLE001 - exit goes on regardless
        log.exception("stopping playables at exit failed")
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        log.exception("running exit functions failed")
    try:
        from telecom import engine as engine_module
        from telecom import receive as receive_module

        receiver = receive_module._receiver
        if receiver is not None:
            receiver.core.stop(0.5)
        engine = engine_module._engine
        if engine is not None:
            engine.media.stop(0.5)
    except BaseException:  # noqa: BLE001
        log.exception("stopping telecom's native threads at exit failed")


def _source_factory(name: str, what: str = "URL/file sources") -> Callable[..., Any]:
    from telecom import Playable

    factory = getattr(Playable, name, None)
    if factory is None:
        raise CApiError(TELECOM_E_UNSUPPORTED, f"this build of telecom has no {what} "
                                               f"(Playable.{name} is missing)")
    return factory


def _receive_api() -> Any:
    try:
        from telecom.output import Output
    except ImportError:
        raise CApiError(TELECOM_E_UNSUPPORTED, "this build of telecom has no receive path "
                                               "(telecom.output.Output is missing)") from None
    return Output


def install(ffi: Any, lib: Any, names: list[str]) -> Api:
    """Attach every exported C function (``names``, from telecom.h) to its implementation, wrapped for
    status codes and errors."""
    api = Api(ffi, lib)
    for name in names:
        result_kind = ffi.typeof(getattr(lib, name)).result.kind
        ffi.def_extern(name=name)(_wrap(ffi, lib, getattr(api, name), result_kind))
    ffi.def_extern(name="_telecom_exit_hook")(lambda: _at_exit(api))
    if lib._telecom_register_exit() != 0:
        log.warning("atexit() refused telecom's exit hook: threads may outlive exit()")
    return api


def _wrap(ffi: Any, lib: Any, method: Callable[..., Any], result_kind: str) -> Callable[..., Any]:
    failure: Any = ffi.NULL if result_kind == "pointer" else None
    set_error = lib._telecom_set_error

    def call(*args: Any) -> Any:
        set_error(TELECOM_OK, ffi.NULL)
        try:
            return method(*args)
        except BaseException as exc:  # noqa: BLE001 - nothing may cross into C
            status = status_of(exc)
            message = str(exc) or type(exc).__name__
            if status == TELECOM_E_INTERNAL:
                log.exception("%s failed", method.__name__)
                message = f"{type(exc).__name__}: {message}"
            set_error(status, f"{method.__name__}: {message}".encode("utf-8", "replace"))
            if result_kind == "primitive":
                return status
            return failure

    call.__name__ = method.__name__
    return call
