# C contract of telecom._fast.rtp: the RTP header work the native send/receive engine does per packet.
# All three functions are pure byte arithmetic: no Python objects, no allocation, safe without the GIL.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef enum:
    RTP_HEADER_SIZE = 12
    PACKET_OTHER = 0
    PACKET_RTP = 1
    PACKET_RTCP = 2

# Writes the 12-byte send header of spec §2.3 (V=2, P=0, X=0, CC=0) to out; returns 12.
cdef Py_ssize_t rtp_write_header(unsigned char* out, uint8_t payload_type, bint marker,
                                 uint16_t sequence, uint32_t timestamp, uint32_t ssrc) noexcept nogil

# The rtpsize rule (spec §2.4): length of the unencrypted, authenticated prefix
# = 12 + 4*CC + (4 if X). -1 if the packet is shorter than that or its version is not 2.
cdef Py_ssize_t rtp_aad_length(const unsigned char* pkt, Py_ssize_t n) noexcept nogil

# Spec §2.7 demultiplexing: PACKET_RTCP, PACKET_RTP or PACKET_OTHER.
cdef int rtp_classify(const unsigned char* pkt, Py_ssize_t n) noexcept nogil
