/*
 * What one Opus frame costs libopus alone, outside telecom: the encoded-density floor. Built and run by
 * bench/opus_floor.py against a given libopus.
 *
 *   opus_encode SIGNAL FRAMES ENCODERS
 *
 * SIGNAL: "tone" (440 Hz sine, what density.py plays), "music" (a vibrato chord with a swell, two
 * different channels, a little noise) or "speech" (a gliding 20-harmonic buzz in syllables, with
 * pauses). Each of ENCODERS encoders (48 kHz stereo, application audio, 64 kbit/s, complexity 10,
 * FEC off, no expected loss: telecom's defaults) encodes FRAMES 20 ms frames, the encoders taking
 * turns as a media thread's connections do. Prints one JSON line with the thread CPU time per frame.
 */
#include <math.h>
#include <opus.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RATE 48000
#define FRAME 960

static unsigned seed = 1;

static double noise(void)
{
    seed = seed * 1103515245u + 12345u;
    return ((seed >> 8) & 0xffff) / 65536.0 - 0.5;
}

static short clip(double v)
{
    return (short)(v > 32767 ? 32767 : v < -32768 ? -32768 : v);
}

static void synthesise(const char *signal, short *pcm, long samples)
{
    for (long i = 0; i < samples; i++) {
        double t = (double)i / RATE, left = 0, right = 0;
        if (strcmp(signal, "tone") == 0) {
            left = right = 16000 * sin(2 * M_PI * 440 * t);
        } else if (strcmp(signal, "music") == 0) {
            double f0 = 220 * (1 + 0.01 * sin(2 * M_PI * 5 * t));
            for (int h = 1; h <= 8; h++)
                left += 4000.0 / h * sin(2 * M_PI * f0 * h * t + h);
            left += 3000 * sin(2 * M_PI * 330 * t) * (0.5 + 0.5 * sin(2 * M_PI * 0.5 * t)) + 400 * noise();
            right = 0.8 * left + 2000 * sin(2 * M_PI * 554 * t);
        } else {
            double envelope = fmax(0, sin(2 * M_PI * 3 * t)) * (fmod(t, 2.0) < 1.4);
            double f0 = 120 + 30 * sin(2 * M_PI * 1.3 * t);
            for (int h = 1; h <= 20; h++)
                left += 3000.0 / h * sin(2 * M_PI * f0 * h * t);
            left = right = left * envelope + 200 * noise();
        }
        pcm[2 * i] = clip(left);
        pcm[2 * i + 1] = clip(right);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    const char *signal = argv[1];
    int frames = atoi(argv[2]), encoders = atoi(argv[3]);
    if (frames < 1 || encoders < 1 || encoders > 1024)
        return 2;
    short *pcm = malloc(sizeof(short) * 2 * FRAME * (size_t)frames);
    OpusEncoder **enc = calloc(encoders, sizeof *enc);
    if (pcm == NULL || enc == NULL)
        return 3;
    synthesise(signal, pcm, (long)frames * FRAME);
    for (int e = 0; e < encoders; e++) {
        int err;
        enc[e] = opus_encoder_create(RATE, 2, OPUS_APPLICATION_AUDIO, &err);
        if (enc[e] == NULL)
            return 3;
        opus_encoder_ctl(enc[e], OPUS_SET_BITRATE(64000));
        opus_encoder_ctl(enc[e], OPUS_SET_COMPLEXITY(10));
        opus_encoder_ctl(enc[e], OPUS_SET_INBAND_FEC(0));
        opus_encoder_ctl(enc[e], OPUS_SET_PACKET_LOSS_PERC(0));
    }
    unsigned char packet[1500];
    long bytes = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (int f = 0; f < frames; f++)
        for (int e = 0; e < encoders; e++) {
            /* each encoder at its own place in the signal, so they do not encode the same frames */
            int at = (f + e * 37) % frames;
            int n = opus_encode(enc[e], pcm + 2 * FRAME * (size_t)at, FRAME, packet, sizeof packet);
            if (n < 0) {
                fprintf(stderr, "opus_encode: %s\n", opus_strerror(n));
                return 4;
            }
            bytes += n;
        }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    double total = (double)frames * encoders;
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / total;
    printf("{\"signal\": \"%s\", \"frames\": %d, \"encoders\": %d, \"us_per_frame\": %.3f, \"kbps\": %.2f, "
           "\"encoder_bytes\": %d, \"version\": \"%s\"}\n", signal, frames, encoders, us,
           bytes * 8.0 / (total * 0.02) / 1000, opus_encoder_get_size(2), opus_get_version_string());
    return 0;
}
