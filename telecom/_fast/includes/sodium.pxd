# libsodium declarations telecom uses (XChaCha20-Poly1305 IETF AEAD, memory wiping).
# Every function here is pure C and safe to call without the GIL; sodium_init() must run once first
# (telecom._fast.aead calls it at import).

cdef extern from "sodium.h" nogil:
    int sodium_init()
    void sodium_memzero(void* pnt, size_t length)

    enum:
        crypto_aead_xchacha20poly1305_ietf_KEYBYTES
        crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
        crypto_aead_xchacha20poly1305_ietf_ABYTES

    int crypto_aead_xchacha20poly1305_ietf_encrypt_detached(
        unsigned char* c, unsigned char* mac, unsigned long long* maclen_p,
        const unsigned char* m, unsigned long long mlen,
        const unsigned char* ad, unsigned long long adlen,
        const unsigned char* nsec, const unsigned char* npub, const unsigned char* k)

    int crypto_aead_xchacha20poly1305_ietf_decrypt_detached(
        unsigned char* m, unsigned char* nsec,
        const unsigned char* c, unsigned long long clen,
        const unsigned char* mac,
        const unsigned char* ad, unsigned long long adlen,
        const unsigned char* npub, const unsigned char* k)
