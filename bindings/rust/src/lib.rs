//! Discord voice from Rust, over telecom's C ABI (`libtelecom.so`, see `telecom/capi/telecom.h`).
//!
//! This crate owns the Rust face of the C functions: handles that free themselves on `Drop`, `Result`s
//! built from the status codes plus `telecom_last_error()`, `&str`/`&[u8]`/`Duration` instead of raw
//! pointers. It must not add behaviour of its own: everything happens in telecom's engine.
//!
//! ```no_run
//! use std::time::Duration;
//! use telecom::{Client, Playable};
//!
//! # fn main() -> telecom::Result<()> {
//! let client = Client::new(1234, 5678, "session id", Some(91011))?;
//! client.set_server_info(Some("host:443"), "token", None)?;
//! client.wait_ready(Duration::from_secs(10))?;
//! let pipe = Playable::pcm_pipe()?;
//! client.play(&pipe)?;
//! pipe.send(&[0u8; 3840])?; // 20 ms of 48 kHz s16le stereo silence
//! # Ok(())
//! # }
//! ```
//!
//! Build libtelecom first (`python -m telecom.capi.build --out DIR`) and set `TELECOM_LIB_DIR=DIR`
//! when running cargo.

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::{c_char, c_int};
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

/// The raw C declarations, matching `telecom.h`.
pub mod ffi {
    use std::os::raw::{c_char, c_int, c_void};

    #[repr(C)]
    pub struct TelecomClient {
        _private: [u8; 0],
    }

    #[repr(C)]
    pub struct TelecomPlayable {
        _private: [u8; 0],
    }

    #[repr(C)]
    pub struct TelecomEvent {
        pub name: [c_char; 32],
        pub json: [c_char; 1024],
        pub user_id: u64,
        pub truncated: c_int,
    }

    pub type TelecomEventCallback = Option<unsafe extern "C" fn(*const TelecomEvent, *mut c_void)>;

    pub const TELECOM_OK: c_int = 0;
    pub const TELECOM_E_INVALID: c_int = -1;
    pub const TELECOM_E_TIMEOUT: c_int = -2;
    pub const TELECOM_E_FULL: c_int = -3;
    pub const TELECOM_E_CLOSED: c_int = -4;
    pub const TELECOM_E_UNSUPPORTED: c_int = -5;
    pub const TELECOM_E_CONNECTION: c_int = -6;
    pub const TELECOM_E_INIT: c_int = -7;
    pub const TELECOM_E_IO: c_int = -8;
    pub const TELECOM_E_EMPTY: c_int = -9;
    pub const TELECOM_E_INTERNAL: c_int = -10;

    extern "C" {
        pub fn telecom_version() -> *const c_char;
        pub fn telecom_last_status() -> c_int;
        pub fn telecom_last_error() -> *const c_char;
        pub fn telecom_status_name(status: c_int) -> *const c_char;

        pub fn create_client_with_channel(
            user_id: u64,
            guild_id: u64,
            session_id: *const c_char,
            channel_id: u64,
        ) -> *mut TelecomClient;
        pub fn client_set_channel_id(client: *mut TelecomClient, channel_id: u64) -> c_int;
        pub fn client_set_server_info_ex(
            client: *mut TelecomClient,
            endpoint: *const c_char,
            token: *const c_char,
            ca_file: *const c_char,
        ) -> c_int;
        pub fn client_wait_ready(client: *mut TelecomClient, timeout_ms: c_int) -> c_int;
        pub fn client_play(client: *mut TelecomClient, playable: *mut TelecomPlayable) -> c_int;
        pub fn client_stop(client: *mut TelecomClient) -> c_int;
        pub fn client_set_volume(client: *mut TelecomClient, percent: f64) -> c_int;
        pub fn client_poll_event(client: *mut TelecomClient, out: *mut TelecomEvent) -> c_int;
        pub fn client_wait_event(client: *mut TelecomClient, out: *mut TelecomEvent, timeout_ms: c_int)
            -> c_int;
        pub fn client_set_event_callback(
            client: *mut TelecomClient,
            callback: TelecomEventCallback,
            userdata: *mut c_void,
        ) -> c_int;
        pub fn client_stats_json(client: *mut TelecomClient, buf: *mut c_char, capacity: usize) -> c_int;
        pub fn user_set_output_file(client: *mut TelecomClient, user_id: u64, path: *const c_char) -> c_int;
        pub fn client_set_muxer_file(client: *mut TelecomClient, path: *const c_char) -> c_int;
        pub fn client_destroy(client: *mut TelecomClient);

        pub fn create_playable_from_url(url: *const c_char) -> *mut TelecomPlayable;
        pub fn create_playable_from_file(path: *const c_char) -> *mut TelecomPlayable;
        pub fn create_playable_from_pcm_pipe_ex(buffer_ms: c_int) -> *mut TelecomPlayable;
        pub fn playable_pipe_send(pipe: *mut TelecomPlayable, data: *const u8, len: usize) -> c_int;
        pub fn playable_pipe_send_wait(
            pipe: *mut TelecomPlayable,
            data: *const u8,
            len: usize,
            timeout_ms: c_int,
        ) -> c_int;
        pub fn playable_pipe_close(pipe: *mut TelecomPlayable) -> c_int;
        pub fn create_playable_from_opus_pipe(buffer_ms: c_int) -> *mut TelecomPlayable;
        pub fn playable_opus_send(pipe: *mut TelecomPlayable, packet: *const u8, len: usize) -> c_int;
        pub fn playable_pause(playable: *mut TelecomPlayable) -> c_int;
        pub fn playable_resume(playable: *mut TelecomPlayable) -> c_int;
        pub fn playable_stop(playable: *mut TelecomPlayable) -> c_int;
        pub fn playable_set_volume(playable: *mut TelecomPlayable, percent: f64) -> c_int;
        pub fn playable_wait_done(playable: *mut TelecomPlayable, timeout_ms: c_int) -> c_int;
        pub fn playable_destroy(playable: *mut TelecomPlayable);
    }
}

/// What kind of failure a status code is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    Timeout,
    Full,
    Closed,
    Unsupported,
    Connection,
    Init,
    Io,
    Empty,
    Internal,
    Unknown(i32),
}

impl ErrorKind {
    pub fn from_status(status: i32) -> ErrorKind {
        match status {
            ffi::TELECOM_E_INVALID => ErrorKind::Invalid,
            ffi::TELECOM_E_TIMEOUT => ErrorKind::Timeout,
            ffi::TELECOM_E_FULL => ErrorKind::Full,
            ffi::TELECOM_E_CLOSED => ErrorKind::Closed,
            ffi::TELECOM_E_UNSUPPORTED => ErrorKind::Unsupported,
            ffi::TELECOM_E_CONNECTION => ErrorKind::Connection,
            ffi::TELECOM_E_INIT => ErrorKind::Init,
            ffi::TELECOM_E_IO => ErrorKind::Io,
            ffi::TELECOM_E_EMPTY => ErrorKind::Empty,
            ffi::TELECOM_E_INTERNAL => ErrorKind::Internal,
            other => ErrorKind::Unknown(other),
        }
    }
}

/// A failed call: the status code and telecom's message for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: i32,
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    /// The error of the last call on this thread, for the status it returned.
    fn last(status: c_int) -> Error {
        // SAFETY: the library returns a NUL-terminated thread-local buffer, valid until the next call.
        let message = unsafe { cstr_to_string(ffi::telecom_last_error()) };
        Error { status, kind: ErrorKind::from_status(status), message }
    }

    fn invalid(message: &str) -> Error {
        Error { status: ffi::TELECOM_E_INVALID, kind: ErrorKind::Invalid, message: message.to_string() }
    }

    /// The status code's name, e.g. "TELECOM_E_TIMEOUT".
    pub fn status_name(&self) -> String {
        // SAFETY: telecom_status_name returns a static string for any value.
        unsafe { cstr_to_string(ffi::telecom_status_name(self.status)) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status_name(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

unsafe fn cstr_to_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn check(status: c_int) -> Result<()> {
    if status == ffi::TELECOM_OK {
        Ok(())
    } else {
        Err(Error::last(status))
    }
}

fn c_string(value: &str, what: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::invalid(&format!("{what} contains a NUL byte")))
}

fn c_path(path: &Path) -> Result<CString> {
    let text = path.to_str().ok_or_else(|| Error::invalid("the path is not valid UTF-8"))?;
    c_string(text, "the path")
}

fn opt_ptr(value: &Option<CString>) -> *const c_char {
    value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr())
}

fn millis(timeout: Option<Duration>) -> c_int {
    match timeout {
        None => -1,
        Some(d) => d.as_millis().min(c_int::MAX as u128) as c_int,
    }
}

/// telecom's version ("0.1.0"); fails with `ErrorKind::Init` when the runtime could not be loaded.
pub fn version() -> Result<String> {
    // SAFETY: a static string or NULL.
    let p = unsafe { ffi::telecom_version() };
    if p.is_null() {
        // SAFETY: plain call.
        return Err(Error::last(unsafe { ffi::telecom_last_status() }));
    }
    Ok(unsafe { cstr_to_string(p) })
}

/// An event of a client: its name ("ready", "track_end", ...) and JSON payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub json: String,
    pub user_id: u64,
    pub truncated: bool,
}

impl Event {
    fn from_raw(raw: &ffi::TelecomEvent) -> Event {
        // SAFETY: the library NUL-terminates both arrays.
        unsafe {
            Event {
                name: cstr_to_string(raw.name.as_ptr()),
                json: cstr_to_string(raw.json.as_ptr()),
                user_id: raw.user_id,
                truncated: raw.truncated != 0,
            }
        }
    }
}

fn empty_event() -> ffi::TelecomEvent {
    ffi::TelecomEvent { name: [0; 32], json: [0; 1024], user_id: 0, truncated: 0 }
}

type Callback = Box<dyn Fn(&Event) + Send + Sync + 'static>;

/// A voice connection (one bot in one guild). Dropping it disconnects.
pub struct Client {
    raw: NonNull<ffi::TelecomClient>,
    // Boxed twice so the C side holds a thin pointer; freed only after the library has promised the
    // callback is no longer running (client_set_event_callback / client_destroy returned).
    callback: std::sync::Mutex<Option<Box<Callback>>>,
}

unsafe extern "C" fn call_back(event: *const ffi::TelecomEvent, userdata: *mut std::os::raw::c_void) {
    if event.is_null() || userdata.is_null() {
        return;
    }
    let callback = &*(userdata as *const Callback);
    let event = Event::from_raw(&*event);
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(&event)));
}

// SAFETY: every function of the C ABI is thread-safe; the handle is an id, not memory.
unsafe impl Send for Client {}
unsafe impl Sync for Client {}

impl Client {
    /// A client from VOICE_STATE_UPDATE; `channel_id` is the voice channel (DAVE's group id).
    pub fn new(user_id: u64, guild_id: u64, session_id: &str, channel_id: Option<u64>) -> Result<Client> {
        let session = c_string(session_id, "session_id")?;
        // SAFETY: a valid C string for the duration of the call.
        let raw = unsafe {
            ffi::create_client_with_channel(user_id, guild_id, session.as_ptr(), channel_id.unwrap_or(0))
        };
        match NonNull::new(raw) {
            Some(raw) => Ok(Client { raw, callback: std::sync::Mutex::new(None) }),
            None => Err(Error::last(unsafe { ffi::telecom_last_status() })),
        }
    }

    fn ptr(&self) -> *mut ffi::TelecomClient {
        self.raw.as_ptr()
    }

    /// From VOICE_SERVER_UPDATE: `endpoint` ("host:port", or a ws:// / wss:// URL; `None`: the server is
    /// being reallocated), `token`, and optionally a CA file to trust instead of the system's.
    pub fn set_server_info(&self, endpoint: Option<&str>, token: &str, ca_file: Option<&Path>) -> Result<()> {
        let endpoint = endpoint.map(|e| c_string(e, "endpoint")).transpose()?;
        let token = c_string(token, "token")?;
        let ca = ca_file.map(c_path).transpose()?;
        let status = unsafe {
            ffi::client_set_server_info_ex(
                self.ptr(),
                endpoint.as_ref().map_or(std::ptr::null(), |e| e.as_ptr()),
                token.as_ptr(),
                ca.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        check(status)
    }

    pub fn set_channel_id(&self, channel_id: u64) -> Result<()> {
        check(unsafe { ffi::client_set_channel_id(self.ptr(), channel_id) })
    }

    /// Block until audio can be sent.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        check(unsafe { ffi::client_wait_ready(self.ptr(), millis(Some(timeout))) })
    }

    pub fn play(&self, playable: &Playable) -> Result<()> {
        check(unsafe { ffi::client_play(self.ptr(), playable.ptr()) })
    }

    pub fn stop(&self) -> Result<()> {
        check(unsafe { ffi::client_stop(self.ptr()) })
    }

    /// Percent, 0..=200.
    pub fn set_volume(&self, percent: f64) -> Result<()> {
        check(unsafe { ffi::client_set_volume(self.ptr(), percent) })
    }

    /// The oldest waiting event, if any.
    pub fn poll_event(&self) -> Result<Option<Event>> {
        let mut raw = empty_event();
        match unsafe { ffi::client_poll_event(self.ptr(), &mut raw) } {
            ffi::TELECOM_OK => Ok(Some(Event::from_raw(&raw))),
            ffi::TELECOM_E_EMPTY => Ok(None),
            status => Err(Error::last(status)),
        }
    }

    /// The next event, waiting up to `timeout` (`None` when none came).
    pub fn wait_event(&self, timeout: Duration) -> Result<Option<Event>> {
        let mut raw = empty_event();
        match unsafe { ffi::client_wait_event(self.ptr(), &mut raw, millis(Some(timeout))) } {
            ffi::TELECOM_OK => Ok(Some(Event::from_raw(&raw))),
            ffi::TELECOM_E_TIMEOUT => Ok(None),
            status => Err(Error::last(status)),
        }
    }

    /// Call `callback` for every event, on telecom's io thread (keep it short); replaces an earlier one.
    /// Do not call `set_event_callback`/`clear_event_callback` from inside the callback.
    pub fn set_event_callback<F: Fn(&Event) + Send + Sync + 'static>(&self, callback: F) -> Result<()> {
        let boxed: Box<Callback> = Box::new(Box::new(callback));
        let mut slot = self.callback.lock().unwrap_or_else(|e| e.into_inner());
        let userdata = &*boxed as *const Callback as *mut std::os::raw::c_void;
        check(unsafe { ffi::client_set_event_callback(self.ptr(), Some(call_back), userdata) })?;
        *slot = Some(boxed); // the previous callback is no longer running: drop it
        Ok(())
    }

    /// Stop calling the event callback.
    pub fn clear_event_callback(&self) -> Result<()> {
        let mut slot = self.callback.lock().unwrap_or_else(|e| e.into_inner());
        check(unsafe { ffi::client_set_event_callback(self.ptr(), None, std::ptr::null_mut()) })?;
        *slot = None;
        Ok(())
    }

    /// The client's stats as JSON.
    pub fn stats_json(&self) -> Result<String> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = unsafe { ffi::client_stats_json(self.ptr(), buf.as_mut_ptr() as *mut c_char, buf.len()) };
            if n < 0 {
                return Err(Error::last(n));
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf = vec![0u8; n + 1];
        }
    }

    /// Record `user_id` to a file (`None` stops). `ErrorKind::Unsupported` without a receive path.
    pub fn set_user_output_file(&self, user_id: u64, path: Option<&Path>) -> Result<()> {
        let path = path.map(c_path).transpose()?;
        check(unsafe {
            ffi::user_set_output_file(self.ptr(), user_id, opt_ptr(&path))
        })
    }

    /// Everyone in the channel mixed into one file (`None` stops).
    pub fn set_muxer_file(&self, path: Option<&Path>) -> Result<()> {
        let path = path.map(c_path).transpose()?;
        check(unsafe { ffi::client_set_muxer_file(self.ptr(), opt_ptr(&path)) })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // client_destroy returns once the callback cannot run any more; the Box is dropped after it.
        unsafe { ffi::client_destroy(self.ptr()) }
    }
}

/// Something a client plays. Dropping it stops it.
pub struct Playable {
    raw: NonNull<ffi::TelecomPlayable>,
}

// SAFETY: as for Client.
unsafe impl Send for Playable {}
unsafe impl Sync for Playable {}

impl Playable {
    fn wrap(raw: *mut ffi::TelecomPlayable) -> Result<Playable> {
        match NonNull::new(raw) {
            Some(raw) => Ok(Playable { raw }),
            None => Err(Error::last(unsafe { ffi::telecom_last_status() })),
        }
    }

    fn ptr(&self) -> *mut ffi::TelecomPlayable {
        self.raw.as_ptr()
    }

    /// An http(s) URL, a file:// URL or a local path.
    pub fn from_url(url: &str) -> Result<Playable> {
        let url = c_string(url, "url")?;
        Playable::wrap(unsafe { ffi::create_playable_from_url(url.as_ptr()) })
    }

    pub fn from_file(path: &Path) -> Result<Playable> {
        let path = c_path(path)?;
        Playable::wrap(unsafe { ffi::create_playable_from_file(path.as_ptr()) })
    }

    /// A pipe for 48 kHz s16le stereo PCM with a 10 s buffer.
    pub fn pcm_pipe() -> Result<Playable> {
        Playable::pcm_pipe_with_buffer(Duration::from_secs(10))
    }

    pub fn pcm_pipe_with_buffer(buffer: Duration) -> Result<Playable> {
        Playable::wrap(unsafe { ffi::create_playable_from_pcm_pipe_ex(millis(Some(buffer))) })
    }

    /// A pipe for ready 20 ms Opus packets (sent undecoded while it plays alone at 100 % volume).
    pub fn opus_pipe(buffer: Duration) -> Result<Playable> {
        Playable::wrap(unsafe { ffi::create_playable_from_opus_pipe(millis(Some(buffer))) })
    }

    /// Queue one Opus packet; `ErrorKind::Full` when the queue is full, `Invalid` if it is not one.
    pub fn send_opus(&self, packet: &[u8]) -> Result<()> {
        check(unsafe { ffi::playable_opus_send(self.ptr(), packet.as_ptr(), packet.len()) })
    }

    /// Queue PCM; `ErrorKind::Full` (nothing taken) when it does not fit now.
    pub fn send(&self, pcm: &[u8]) -> Result<()> {
        check(unsafe { ffi::playable_pipe_send(self.ptr(), pcm.as_ptr(), pcm.len()) })
    }

    /// Queue PCM, waiting up to `timeout` (`None`: forever) for room.
    pub fn send_wait(&self, pcm: &[u8], timeout: Option<Duration>) -> Result<()> {
        check(unsafe { ffi::playable_pipe_send_wait(self.ptr(), pcm.as_ptr(), pcm.len(), millis(timeout)) })
    }

    /// No more PCM: play what is buffered, then end.
    pub fn close_input(&self) -> Result<()> {
        check(unsafe { ffi::playable_pipe_close(self.ptr()) })
    }

    pub fn pause(&self) -> Result<()> {
        check(unsafe { ffi::playable_pause(self.ptr()) })
    }

    pub fn resume(&self) -> Result<()> {
        check(unsafe { ffi::playable_resume(self.ptr()) })
    }

    pub fn stop(&self) -> Result<()> {
        check(unsafe { ffi::playable_stop(self.ptr()) })
    }

    pub fn set_volume(&self, percent: f64) -> Result<()> {
        check(unsafe { ffi::playable_set_volume(self.ptr(), percent) })
    }

    /// Block until the playable has ended (`ErrorKind::Timeout` otherwise).
    pub fn wait_done(&self, timeout: Option<Duration>) -> Result<()> {
        check(unsafe { ffi::playable_wait_done(self.ptr(), millis(timeout)) })
    }
}

impl Drop for Playable {
    fn drop(&mut self) {
        unsafe { ffi::playable_destroy(self.ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_kinds() {
        assert_eq!(ErrorKind::from_status(-2), ErrorKind::Timeout);
        assert_eq!(ErrorKind::from_status(-5), ErrorKind::Unsupported);
        assert_eq!(ErrorKind::from_status(-99), ErrorKind::Unknown(-99));
    }

    #[test]
    fn errors_carry_the_library_message() {
        let err = Client::new(1, 2, "", None).err().expect("an empty session id is refused");
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("session_id"), "{}", err.message);
        assert_eq!(err.status_name(), "TELECOM_E_INVALID");
    }

    #[test]
    fn a_full_pipe_says_so_and_takes_nothing() {
        let pipe = Playable::pcm_pipe_with_buffer(Duration::from_millis(20)).unwrap();
        pipe.send(&[0u8; 3840]).unwrap();
        let err = pipe.send(&[0u8; 4]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Full);
        assert!(Client::new(1, 2, "s", None).unwrap().set_volume(300.0).is_err());
    }

    #[test]
    fn an_opus_pipe_refuses_what_is_not_an_opus_packet() {
        let pipe = Playable::opus_pipe(Duration::from_secs(1)).unwrap();
        let err = pipe.send_opus(&[]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    }

    #[test]
    fn the_event_callback_sees_events_and_stops_on_drop() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        let seen = Arc::new(AtomicUsize::new(0));
        let client = Client::new(1, 2, "s", None).unwrap();
        let counter = seen.clone();
        client.set_event_callback(move |event| {
            if event.name == "state" {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }).unwrap();
        // Nothing listens on port 9: the client reports its state changes while it tries.
        client.set_server_info(Some("ws://127.0.0.1:9/"), "token", None).unwrap();
        for _ in 0..200 {
            if seen.load(Ordering::SeqCst) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(seen.load(Ordering::SeqCst) > 0);
        drop(client);
        let after = seen.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(seen.load(Ordering::SeqCst), after, "no call after the client is gone");
    }

    #[test]
    fn version_is_the_python_package_version() {
        assert_eq!(version().unwrap(), "0.1.0");
    }
}
