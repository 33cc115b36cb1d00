# C-level contract of telecom._fast.receive: the native receive core (one per process).
#
# The core owns, per voice connection, the socket's receive side (epoll + recvmmsg), the AEAD open
# state, the SSRC -> user map, the unmapped-packet hold, and per SSRC a jitter buffer and an Opus
# decoder; per muxer an int32 accumulation ring on the arrival clock. Its thread holds no GIL except
# once per receive round to call DAVE frame decryptors for the whole round. Python reaches it only
# through the ReceiveCore methods, which take the core mutex with the GIL released.
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t

from telecom._fast.aead cimport aead_state
from telecom._fast.includes.opus cimport OpusDecoder
from telecom._fast.jitter cimport JB_SLOT_BYTES, jitter_t

cdef extern from "engine_support.h" nogil:
    ctypedef struct tc_mutex:
        pass

cdef extern from "receive_support.h" nogil:
    ctypedef struct tc_cond:
        pass
    ctypedef struct tc_rx_batch:
        pass

cdef enum:
    RX_PENDING_MAX = 64           # unmapped packets held per connection (~1.3 s of one speaker)
    RX_PENDING_NS = 1000000000    # ... for at most 1 s
    RX_MAX_DELIVER = 256          # users with a per-user output, per connection
    RX_QUEUE = 32                 # batches (ticks) waiting for the output worker: 640 ms
    RX_FRAME_MAX = 5760           # samples per channel of the longest Opus packet (120 ms)
    MUX_RING = 4 * 48000          # muxer accumulation window, samples per channel (4 s)

    # record kinds handed to Python
    REC_FRAME = 1
    REC_MUX = 2
    REC_SPEAKING_START = 3
    REC_SPEAKING_STOP = 4

    # record flags
    RF_CONCEALED = 1
    RF_FEC = 2
    RF_SPURT_START = 4

ctypedef struct stream_t:
    uint32_t ssrc
    int64_t user_id
    bint speaking
    bint deliver
    OpusDecoder* dec
    int64_t packets
    int64_t frames
    int64_t concealed
    int64_t fec_recovered
    int64_t decode_errors
    jitter_t jb

ctypedef struct ssrc_map_t:
    uint32_t ssrc
    int64_t user_id

ctypedef struct pend_t:
    uint32_t ssrc
    uint16_t seq
    uint32_t ts
    int64_t arrival_ns
    int len
    unsigned char data[JB_SLOT_BYTES]

ctypedef struct mux_t:
    int64_t id
    int64_t origin_ns
    int64_t emitted             # samples per channel emitted since origin
    int64_t delay_ns
    int32_t* acc                # MUX_RING * 2 interleaved
    int64_t blocks
    int64_t late_samples
    int64_t frames_in
    int refs

ctypedef struct rconn_t:
    int64_t id
    int fd
    aead_state aead
    bint has_key
    bint has_decryptor
    bint pending_dirty
    mux_t* mux
    ssrc_map_t* map
    int nmap
    int capmap
    stream_t** streams
    int nstreams
    int capstreams
    pend_t* pending
    int npending
    int64_t deliver_users[RX_MAX_DELIVER]
    int ndeliver
    int depth
    int64_t packets
    int64_t bytes
    int64_t rtcp
    int64_t other
    int64_t not_audio
    int64_t decrypt_failures
    int64_t dave_failures
    int64_t unmapped_held
    int64_t unmapped_dropped
    int64_t recv_errors

ctypedef struct orec_t:
    int kind
    int flags
    int64_t conn_id
    int64_t user_id             # or the muxer id for REC_MUX
    uint32_t ssrc
    uint32_t rtp_ts
    int64_t time_ns
    int nsamples                # per channel
    Py_ssize_t pcm_off          # in int16 values

ctypedef struct batch_t:
    orec_t* recs
    int nrecs
    int caprecs
    int16_t* pcm
    Py_ssize_t npcm
    Py_ssize_t cappcm
