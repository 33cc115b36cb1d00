# libopus declarations (opus.h, libopus 1.3) plus the typed ctl helpers of csrc/opus_ctl.h.
#
# Everything is `nogil`: none of these functions touches a Python object, so the media engine can call
# them from its GIL-free loops. The encoder/decoder objects are NOT thread-safe: one thread at a time.
# Cimport with `from telecom._fast.includes.opus cimport ...`.

from libc.stdint cimport int16_t, int32_t

cdef extern from "opus.h" nogil:
    ctypedef int16_t opus_int16
    ctypedef int32_t opus_int32

    ctypedef struct OpusEncoder:
        pass
    ctypedef struct OpusDecoder:
        pass

    # error codes (opus_defines.h)
    enum:
        OPUS_OK
        OPUS_BAD_ARG
        OPUS_BUFFER_TOO_SMALL
        OPUS_INTERNAL_ERROR
        OPUS_INVALID_PACKET
        OPUS_UNIMPLEMENTED
        OPUS_INVALID_STATE
        OPUS_ALLOC_FAIL

    # applications, signals, bandwidths, special values
    enum:
        OPUS_APPLICATION_VOIP
        OPUS_APPLICATION_AUDIO
        OPUS_APPLICATION_RESTRICTED_LOWDELAY
        OPUS_SIGNAL_VOICE
        OPUS_SIGNAL_MUSIC
        OPUS_BANDWIDTH_NARROWBAND
        OPUS_BANDWIDTH_MEDIUMBAND
        OPUS_BANDWIDTH_WIDEBAND
        OPUS_BANDWIDTH_SUPERWIDEBAND
        OPUS_BANDWIDTH_FULLBAND
        OPUS_AUTO
        OPUS_BITRATE_MAX

    const char* opus_strerror(int error)
    const char* opus_get_version_string()

    int opus_encoder_get_size(int channels)
    OpusEncoder* opus_encoder_create(opus_int32 Fs, int channels, int application, int* error)
    int opus_encoder_init(OpusEncoder* st, opus_int32 Fs, int channels, int application)
    opus_int32 opus_encode(OpusEncoder* st, const opus_int16* pcm, int frame_size,
                           unsigned char* data, opus_int32 max_data_bytes)
    opus_int32 opus_encode_float(OpusEncoder* st, const float* pcm, int frame_size,
                                 unsigned char* data, opus_int32 max_data_bytes)
    void opus_encoder_destroy(OpusEncoder* st)

    int opus_decoder_get_size(int channels)
    OpusDecoder* opus_decoder_create(opus_int32 Fs, int channels, int* error)
    int opus_decoder_init(OpusDecoder* st, opus_int32 Fs, int channels)
    int opus_decode(OpusDecoder* st, const unsigned char* data, opus_int32 len,
                    opus_int16* pcm, int frame_size, int decode_fec)
    int opus_decode_float(OpusDecoder* st, const unsigned char* data, opus_int32 len,
                          float* pcm, int frame_size, int decode_fec)
    void opus_decoder_destroy(OpusDecoder* st)

    # packet inspection (no decoder state needed)
    int opus_packet_get_bandwidth(const unsigned char* data)
    int opus_packet_get_samples_per_frame(const unsigned char* data, opus_int32 Fs)
    int opus_packet_get_nb_channels(const unsigned char* data)
    int opus_packet_get_nb_frames(const unsigned char* packet, opus_int32 len)
    int opus_packet_get_nb_samples(const unsigned char* packet, opus_int32 len, opus_int32 Fs)
    int opus_decoder_get_nb_samples(const OpusDecoder* dec, const unsigned char* packet, opus_int32 len)


# Typed wrappers for the variadic opus_*_ctl requests; each returns libopus' status (0 = OPUS_OK).
cdef extern from "opus_ctl.h" nogil:
    int tc_opus_set_bitrate(OpusEncoder* enc, opus_int32 bps)
    int tc_opus_get_bitrate(OpusEncoder* enc, opus_int32* bps)
    int tc_opus_set_complexity(OpusEncoder* enc, opus_int32 complexity)
    int tc_opus_set_inband_fec(OpusEncoder* enc, opus_int32 on)
    int tc_opus_set_packet_loss_perc(OpusEncoder* enc, opus_int32 percent)
    int tc_opus_set_signal(OpusEncoder* enc, opus_int32 signal)
    int tc_opus_set_bandwidth(OpusEncoder* enc, opus_int32 bandwidth)
    int tc_opus_set_dtx(OpusEncoder* enc, opus_int32 on)
    int tc_opus_get_lookahead(OpusEncoder* enc, opus_int32* samples)
    int tc_opus_encoder_reset(OpusEncoder* enc)

    int tc_opus_decoder_reset(OpusDecoder* dec)
    int tc_opus_get_last_packet_duration(OpusDecoder* dec, opus_int32* samples)
    int tc_opus_set_gain(OpusDecoder* dec, opus_int32 q8_db)
