/* Typed wrappers for libopus' variadic ctl requests (OPUS_SET_BITRATE(x) and friends).
 *
 * The opus_encoder_ctl()/opus_decoder_ctl() macros expand to a variadic call whose argument type is
 * checked by a macro trick (__opus_check_int); Cython cannot spell that portably, so every request the
 * extensions need gets one static inline function here. All of them are plain C with no Python
 * objects: safe to call without the GIL. Each returns libopus' status (OPUS_OK == 0, < 0 on error).
 */
#ifndef TELECOM_OPUS_CTL_H
#define TELECOM_OPUS_CTL_H

#include <opus.h>

/* ---- encoder ---------------------------------------------------------------------------------- */
static inline int tc_opus_set_bitrate(OpusEncoder *enc, opus_int32 bps) {
    return opus_encoder_ctl(enc, OPUS_SET_BITRATE(bps));
}
static inline int tc_opus_get_bitrate(OpusEncoder *enc, opus_int32 *bps) {
    return opus_encoder_ctl(enc, OPUS_GET_BITRATE(bps));
}
static inline int tc_opus_set_complexity(OpusEncoder *enc, opus_int32 complexity) {
    return opus_encoder_ctl(enc, OPUS_SET_COMPLEXITY(complexity));
}
static inline int tc_opus_set_inband_fec(OpusEncoder *enc, opus_int32 on) {
    return opus_encoder_ctl(enc, OPUS_SET_INBAND_FEC(on));
}
static inline int tc_opus_set_packet_loss_perc(OpusEncoder *enc, opus_int32 percent) {
    return opus_encoder_ctl(enc, OPUS_SET_PACKET_LOSS_PERC(percent));
}
static inline int tc_opus_set_signal(OpusEncoder *enc, opus_int32 signal) {
    return opus_encoder_ctl(enc, OPUS_SET_SIGNAL(signal));
}
static inline int tc_opus_set_bandwidth(OpusEncoder *enc, opus_int32 bandwidth) {
    return opus_encoder_ctl(enc, OPUS_SET_BANDWIDTH(bandwidth));
}
static inline int tc_opus_set_dtx(OpusEncoder *enc, opus_int32 on) {
    return opus_encoder_ctl(enc, OPUS_SET_DTX(on));
}
/* Samples per channel (at the encoder's rate) that the encoder delays its output by. */
static inline int tc_opus_get_lookahead(OpusEncoder *enc, opus_int32 *samples) {
    return opus_encoder_ctl(enc, OPUS_GET_LOOKAHEAD(samples));
}
static inline int tc_opus_encoder_reset(OpusEncoder *enc) {
    return opus_encoder_ctl(enc, OPUS_RESET_STATE);
}

/* ---- decoder ---------------------------------------------------------------------------------- */
static inline int tc_opus_decoder_reset(OpusDecoder *dec) {
    return opus_decoder_ctl(dec, OPUS_RESET_STATE);
}
/* Samples per channel of the last decoded packet (or of the concealment). */
static inline int tc_opus_get_last_packet_duration(OpusDecoder *dec, opus_int32 *samples) {
    return opus_decoder_ctl(dec, OPUS_GET_LAST_PACKET_DURATION(samples));
}
static inline int tc_opus_set_gain(OpusDecoder *dec, opus_int32 q8_db) {
    return opus_decoder_ctl(dec, OPUS_SET_GAIN(q8_db));
}

#endif /* TELECOM_OPUS_CTL_H */
