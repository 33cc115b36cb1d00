# C contract of telecom._fast.aead: transport encryption of the two `_rtpsize` AEAD modes (spec §2.4).
# Everything here runs without the GIL and never raises: errors are negative return codes.
from libc.stdint cimport uint32_t

cdef enum:
    MODE_AES256_GCM_RTPSIZE = 1
    MODE_XCHACHA20_POLY1305_RTPSIZE = 2
    AEAD_TAG_SIZE = 16
    AEAD_COUNTER_SIZE = 4
    AEAD_OVERHEAD = 20          # tag + counter
    AEAD_ERR_SHORT = -1
    AEAD_ERR_MALFORMED = -2
    AEAD_ERR_AUTH = -3
    AEAD_ERR_INTERNAL = -4

ctypedef struct aead_state:
    int mode
    unsigned char key[32]
    void* enc_ctx      # EVP_CIPHER_CTX* for AES-GCM, keyed once at init (per packet only the IV is set)
    void* dec_ctx      # separate context for open, so one sender thread and one receiver thread can share a state

# 0 ok, <0 error (AEAD_ERR_MALFORMED: unknown mode; AEAD_ERR_INTERNAL: OpenSSL failed).
# On error the state is left cleared (aead_clear is still safe to call).
cdef int aead_init(aead_state* st, int mode, const unsigned char* key) noexcept nogil

# Frees the contexts and wipes the key. Safe on a zeroed or already-cleared state.
cdef void aead_clear(aead_state* st) noexcept nogil

# Writes aad ‖ ciphertext ‖ tag ‖ counter(BE) to out (capacity >= aad_len+payload_len+20); returns the
# total length or <0. out may alias aad (aad == out) and payload may sit at out+aad_len (in place).
cdef Py_ssize_t aead_seal(aead_state* st, const unsigned char* aad, Py_ssize_t aad_len,
                          const unsigned char* payload, Py_ssize_t payload_len, uint32_t counter,
                          unsigned char* out) noexcept nogil

# rtpsize rule; decrypts into out (capacity >= n); *payload_offset = bytes of encrypted extension body
# to skip at the start of out; strips RTP padding; returns the payload length (excluding the skipped
# extension body) or an AEAD_ERR_* code. *counter is set whenever the packet is long enough to have one.
cdef Py_ssize_t aead_open(aead_state* st, const unsigned char* packet, Py_ssize_t n,
                          unsigned char* out, Py_ssize_t* payload_offset, uint32_t* counter) noexcept nogil
