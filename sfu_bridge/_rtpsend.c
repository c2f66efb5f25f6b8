/* sfu_bridge._rtpsend: one RTP packet in C - out: header template, SRTP, sendto; in: SRTP and
 * the header's fields.
 *
 * The bridge's per-packet send (fastpath.py `RtpWriter.send`) without Python in between: the
 * SSRC's serialised header (with its RFC 8285 extensions) is copied into a stack buffer, the
 * marker/payload type, sequence number and timestamp patched in, the payload copied behind
 * it, the packet protected in place by libsrtp's `srtp_protect` (the copy pylibsrtp carries,
 * reached through its function pointer: aiortc_compat.py) and handed to the socket with one
 * `sendto`. Nothing is allocated but the returned int.
 *
 * send(path, template, b1, seq, timestamp, payload) -> int
 *   path: (srtp_protect address, srtp_t, socket fd, struct sockaddr as bytes, owner): `owner`
 *   is the object that keeps the srtp_t alive (aiortc_compat.FastSrtp), held by the tuple so
 *   the pointer cannot outlive its session; the caller keeps the socket open (a closed one
 *   must not be passed: its descriptor may be reused)
 *   b1: the header's second byte (marker << 7 | payload type)
 *   returns the SRTP packet's length (>= 0), or -errno when the socket refused it (the
 *   packet was protected: its sequence number is used); raises ValueError for a packet
 *   longer than the buffer, ConnectionError when libsrtp refuses to protect it.
 *
 * unprotect(srtp_unprotect address, srtp_t, datagram, hint_id) -> tuple or int
 *   A publisher's SRTP packet (aiortc_compat.RtpIngress): copied into a stack buffer,
 *   unprotected in place by libsrtp's `srtp_unprotect` (authentication, replay window and
 *   rollover counter are the session's own, as when aiortc unprotects), then parsed exactly
 *   as aiortc's `RtpPacket.parse` does (CSRCs, RFC 8285 one- and two-byte extensions,
 *   padding). Returns (payload type, sequence number, timestamp, payload, hint) where hint is
 *   the value of the first extension element with id `hint_id` (bytes) or None; or, when the
 *   packet is dropped, an int: libsrtp's error status (> 0: authentication, replay, ...) or
 *   -1 when the plaintext is not a well-formed RTP packet. The caller keeps the srtp_t alive.
 *
 * Also: pack10 (AIC payload codes, aic_payload.py) and hint_pads / hint_accept (the hint
 * tags and replay windows of a bridge's streams, hint_auth.py `HintTable`), below; hint_sha
 * names (or switches) the SHA-256 compression the tags use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SHA_NI_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <sys/types.h>

/* libsrtp 2: srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *len_ptr) */
typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

#define BUFFER_BYTES 1500
#define SRTP_MAX_TRAILER 144 /* libsrtp's SRTP_MAX_TRAILER_LEN */

static PyObject *send_packet(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "send(path, template, b1, seq, timestamp, payload)");
        return NULL;
    }
    PyObject *path = args[0], *tmpl = args[1], *payload = args[5];
    if (!PyTuple_CheckExact(path) || PyTuple_GET_SIZE(path) != 5 || !PyBytes_CheckExact(tmpl)
        || !PyBytes_CheckExact(payload) || !PyBytes_CheckExact(PyTuple_GET_ITEM(path, 3))) {
        PyErr_SetString(PyExc_TypeError,
                        "path must be (protect, srtp, fd, sockaddr bytes, owner); template and payload bytes");
        return NULL;
    }
    srtp_protect_fn protect = (srtp_protect_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(path, 0));
    void *ctx = PyLong_AsVoidPtr(PyTuple_GET_ITEM(path, 1));
    long fd = PyLong_AsLong(PyTuple_GET_ITEM(path, 2));
    long b1 = PyLong_AsLong(args[2]);
    long seq = PyLong_AsLong(args[3]);
    unsigned long ts = PyLong_AsUnsignedLongMask(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (protect == NULL || ctx == NULL || fd < 0 || b1 < 0 || b1 > 0xFF || seq < 0 || seq > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "bad path, header byte or sequence number");
        return NULL;
    }
    PyObject *sa = PyTuple_GET_ITEM(path, 3);
    Py_ssize_t h = PyBytes_GET_SIZE(tmpl), p = PyBytes_GET_SIZE(payload);
    if (h < 12) {
        PyErr_SetString(PyExc_ValueError, "an RTP header is at least 12 bytes");
        return NULL;
    }
    if (h + p > BUFFER_BYTES - SRTP_MAX_TRAILER) {
        PyErr_SetString(PyExc_ValueError, "packet is too long");
        return NULL;
    }
    unsigned char buf[BUFFER_BYTES];
    memcpy(buf, PyBytes_AS_STRING(tmpl), (size_t)h);
    buf[1] = (unsigned char)b1;
    buf[2] = (unsigned char)(seq >> 8);
    buf[3] = (unsigned char)seq;
    buf[4] = (unsigned char)(ts >> 24);
    buf[5] = (unsigned char)(ts >> 16);
    buf[6] = (unsigned char)(ts >> 8);
    buf[7] = (unsigned char)ts;
    memcpy(buf + h, PyBytes_AS_STRING(payload), (size_t)p);
    int n = (int)(h + p);
    int rc = protect(ctx, buf, &n);
    if (rc != 0) {
        PyErr_Format(PyExc_ConnectionError, "srtp_protect failed (%d)", rc);
        return NULL;
    }
    ssize_t sent = sendto((int)fd, buf, (size_t)n, MSG_DONTWAIT,
                          (const struct sockaddr *)PyBytes_AS_STRING(sa), (socklen_t)PyBytes_GET_SIZE(sa));
    return PyLong_FromLong(sent < 0 ? -(long)errno : (long)n);
}

/* libsrtp 2: srtp_err_status_t srtp_unprotect(srtp_t ctx, void *srtp_hdr, int *len_ptr) */
typedef int (*srtp_unprotect_fn)(void *ctx, void *srtp_hdr, int *len_ptr);

#define MALFORMED (-1)

/* The extension block [pos, end): every element well formed (as aiortc's
 * unpack_header_extensions); hint_at, hint_len: the first element with id hint_id. */
static int scan_extensions(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, unsigned profile,
                           long hint_id, Py_ssize_t *hint_at, Py_ssize_t *hint_len) {
    if (profile == 0xBEDE) {
        while (pos < end) {
            if (buf[pos] == 0) {
                pos++;
                continue;
            }
            long id = buf[pos] >> 4;
            Py_ssize_t len = (buf[pos] & 0x0F) + 1;
            pos++;
            if (end < pos + len) {
                return MALFORMED;
            }
            if (id == hint_id && *hint_at < 0) {
                *hint_at = pos;
                *hint_len = len;
            }
            pos += len;
        }
    } else if (profile == 0x1000) {
        while (pos < end) {
            if (buf[pos] == 0) {
                pos++;
                continue;
            }
            if (end < pos + 2) {
                return MALFORMED;
            }
            long id = buf[pos];
            Py_ssize_t len = buf[pos + 1];
            pos += 2;
            if (end < pos + len) {
                return MALFORMED;
            }
            if (id == hint_id && *hint_at < 0) {
                *hint_at = pos;
                *hint_len = len;
            }
            pos += len;
        }
    }
    return 0;
}

static PyObject *unprotect_packet(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "unprotect(unprotect_fn, srtp, datagram: bytes, hint_id)");
        return NULL;
    }
    srtp_unprotect_fn unprotect = (srtp_unprotect_fn)PyLong_AsVoidPtr(args[0]);
    void *ctx = PyLong_AsVoidPtr(args[1]);
    long hint_id = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (unprotect == NULL || ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "bad unprotect function or srtp_t");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(args[2]);
    if (n < 12 || n > BUFFER_BYTES) {
        return PyLong_FromLong(MALFORMED);
    }
    unsigned char buf[BUFFER_BYTES];
    memcpy(buf, PyBytes_AS_STRING(args[2]), (size_t)n);
    int len = (int)n;
    int rc = unprotect(ctx, buf, &len);
    if (rc != 0) {
        return PyLong_FromLong(rc);
    }
    n = len;
    if (n < 12 || (buf[0] >> 6) != 2) {
        return PyLong_FromLong(MALFORMED);
    }
    Py_ssize_t pos = 12 + 4 * (Py_ssize_t)(buf[0] & 0x0F);
    if (n < pos) {
        return PyLong_FromLong(MALFORMED);
    }
    Py_ssize_t hint_at = -1, hint_len = 0;
    if (buf[0] & 0x10) {
        if (n < pos + 4) {
            return PyLong_FromLong(MALFORMED);
        }
        unsigned profile = ((unsigned)buf[pos] << 8) | buf[pos + 1];
        Py_ssize_t ext_end = pos + 4 + 4 * (Py_ssize_t)(((unsigned)buf[pos + 2] << 8) | buf[pos + 3]);
        if (n < ext_end) {
            return PyLong_FromLong(MALFORMED);
        }
        if (scan_extensions(buf, pos + 4, ext_end, profile, hint_id, &hint_at, &hint_len) != 0) {
            return PyLong_FromLong(MALFORMED);
        }
        pos = ext_end;
    }
    Py_ssize_t end = n;
    if (buf[0] & 0x20) {
        Py_ssize_t pad = buf[n - 1];
        if (pad == 0 || pad > n - pos) {
            return PyLong_FromLong(MALFORMED);
        }
        end = n - pad;
    }
    unsigned long ts = ((unsigned long)buf[4] << 24) | ((unsigned long)buf[5] << 16)
                       | ((unsigned long)buf[6] << 8) | buf[7];
    PyObject *hint = hint_at < 0 ? Py_NewRef(Py_None)
                                 : PyBytes_FromStringAndSize((const char *)buf + hint_at, hint_len);
    if (hint == NULL) {
        return NULL;
    }
    PyObject *payload = PyBytes_FromStringAndSize((const char *)buf + pos, end - pos);
    if (payload == NULL) {
        Py_DECREF(hint);
        return NULL;
    }
    return Py_BuildValue("(iiNNN)", buf[1] & 0x7F, ((int)buf[2] << 8) | buf[3],
                         PyLong_FromUnsignedLong(ts), payload, hint);
}

/* pack10(codes) -> bytes: int16 codes (a C-contiguous buffer, in wire order: frame-major,
 * codebook-minor) as 10-bit fields, MSB first, zero-padded to a byte (models/bitpack.py's
 * format). ValueError on a value outside [0, 1024). */
static PyObject *pack10(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (view.itemsize != 2 || view.format == NULL || (strcmp(view.format, "h") != 0 && strcmp(view.format, "<h") != 0
                                                       && strcmp(view.format, "=h") != 0)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "pack10 needs int16 codes");
        return NULL;
    }
    Py_ssize_t n = view.len / 2;
    const int16_t *codes = (const int16_t *)view.buf;
    Py_ssize_t nbytes = (n * 10 + 7) / 8;
    PyObject *out = PyBytes_FromStringAndSize(NULL, nbytes);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    uint32_t acc = 0;
    int bits = 0;
    Py_ssize_t j = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int16_t c = codes[i];
        if (c < 0 || c >= 1024) {
            PyBuffer_Release(&view);
            Py_DECREF(out);
            PyErr_Format(PyExc_ValueError, "code value %d out of range [0, 1024)", (int)c);
            return NULL;
        }
        acc = (acc << 10) | (uint32_t)c;
        bits += 10;
        while (bits >= 8) {
            bits -= 8;
            dst[j++] = (uint8_t)(acc >> bits);
        }
        acc &= (1u << bits) - 1u;
    }
    if (bits)
        dst[j++] = (uint8_t)(acc << (8 - bits));
    PyBuffer_Release(&view);
    return out;
}


/* ---------------------------------------------------------------------- hint tags (SHA-256)
 * hint_auth.py's tag, HMAC-SHA256(key, index (6 bytes) || body (6 bytes)) truncated to 10
 * bytes, from the key's pads hashed once (RFC 2104): a pad's SHA-256 state after its one
 * 64-byte block (a "midstate"), so a tag costs two compressions. FIPS 180-4. */
static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
static const uint32_t SHA256_IV[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t st[8], const uint8_t blk[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)blk[4 * i] << 24 | (uint32_t)blk[4 * i + 1] << 16 | (uint32_t)blk[4 * i + 2] << 8
               | (uint32_t)blk[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    st[0] += a; st[1] += b; st[2] += c; st[3] += d; st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

#ifdef HAVE_SHA_NI_BUILD
/* sha256_block with the x86 SHA extensions (SHA-NI: Intel since Ice Lake / Goldmont, AMD
 * since Zen), chosen at run time when the CPU has them: the same FIPS 180-4 compression, bit
 * for bit (an integer function: no vendor's arithmetic can differ); hint_accept took 215
 * instead of 630 ns a hint with it on the Xeon it was measured on. The state is kept as the instructions want it (ABEF, CDGH); each group of four
 * rounds adds its four K256 constants to four message words, and the message schedule
 * (W[16..63]) is built four words at a time alongside (msg1/msg2). */
__attribute__((target("sha,sse4.1,ssse3")))
static void sha256_block_ni(uint32_t st[8], const uint8_t blk[64]) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&st[0]), 0xB1); /* CDAB */
    __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&st[4]), 0x1B);  /* EFGH */
    __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);                                         /* ABEF */
    s1 = _mm_blend_epi16(s1, tmp, 0xF0);                                             /* CDGH */
    const __m128i abef = s0, cdgh = s1;
    __m128i w[4];
    for (int g = 0; g < 16; g++) { /* rounds 4g .. 4g+3 */
        __m128i *cur = &w[g & 3], *next = &w[(g + 1) & 3], *prev = &w[(g + 3) & 3];
        if (g < 4)
            *cur = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(blk + 16 * g)), bswap);
        __m128i msg = _mm_add_epi32(*cur, _mm_loadu_si128((const __m128i *)&K256[4 * g]));
        s1 = _mm_sha256rnds2_epu32(s1, s0, msg);
        if (g >= 3 && g <= 14) { /* W[4(g+1) .. 4(g+1)+3] */
            *next = _mm_add_epi32(*next, _mm_alignr_epi8(*cur, *prev, 4));
            *next = _mm_sha256msg2_epu32(*next, *cur);
        }
        s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(msg, 0x0E));
        if (g >= 1 && g <= 12) /* the first half of W[4(g+3) ..] */
            *prev = _mm_sha256msg1_epu32(*prev, *cur);
    }
    s0 = _mm_add_epi32(s0, abef);
    s1 = _mm_add_epi32(s1, cdgh);
    tmp = _mm_shuffle_epi32(s0, 0x1B);  /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);   /* DCHG */
    s0 = _mm_blend_epi16(tmp, s1, 0xF0); /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);    /* HGFE */
    _mm_storeu_si128((__m128i *)&st[0], s0);
    _mm_storeu_si128((__m128i *)&st[4], s1);
}

/* Whether this CPU has SHA-NI (and the SSSE3/SSE4.1 the function above also uses). */
static int cpu_has_sha_ni(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 9)) || !(c & (1u << 19)))
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 29) & 1;
}
#endif

/* The compression hint tags use: SHA-NI's when the CPU has it (set at import), else the
 * portable one; `hint_sha(...)` reads or switches it (tests run both). */
static void (*sha256_compress)(uint32_t st[8], const uint8_t blk[64]) = sha256_block;

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* The 10-byte tag of `msg` (12 bytes: index || body) under the pads' midstates. */
static void hint_tag(const uint32_t pads[16], const uint8_t msg[12], uint8_t tag[10]) {
    uint8_t blk[64];
    uint32_t st[8];
    memset(blk, 0, sizeof blk);
    memcpy(blk, msg, 12);
    blk[12] = 0x80;
    blk[62] = (uint8_t)((64 + 12) * 8 >> 8); /* length in bits: the pad's block and the message */
    blk[63] = (uint8_t)((64 + 12) * 8);
    memcpy(st, pads, 32);
    sha256_compress(st, blk);
    memset(blk, 0, sizeof blk);
    for (int i = 0; i < 8; i++)
        put_be32(blk + 4 * i, st[i]);
    blk[32] = 0x80;
    blk[62] = (uint8_t)((64 + 32) * 8 >> 8);
    blk[63] = (uint8_t)((64 + 32) * 8);
    memcpy(st, pads + 8, 32);
    sha256_compress(st, blk);
    uint8_t full[32];
    for (int i = 0; i < 8; i++)
        put_be32(full + 4 * i, st[i]);
    memcpy(tag, full, 10);
}

/* hint_pads(key) -> bytes: the key's (<= 64 bytes) HMAC-SHA256 inner and outer midstates, 16
 * native uint32 (64 bytes), for hint_accept. */
static PyObject *hint_pads(PyObject *self, PyObject *arg) {
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0)
        return NULL;
    if (key.len > 64) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "hint keys are at most 64 bytes");
        return NULL;
    }
    uint8_t blk[64];
    uint32_t pads[16];
    for (int p = 0; p < 2; p++) {
        memset(blk, 0, sizeof blk);
        memcpy(blk, key.buf, (size_t)key.len);
        for (int i = 0; i < 64; i++)
            blk[i] ^= p == 0 ? 0x36 : 0x5c;
        memcpy(pads + 8 * p, SHA256_IV, 32);
        sha256_block(pads + 8 * p, blk);
    }
    PyBuffer_Release(&key);
    return PyBytes_FromStringAndSize((const char *)pads, sizeof pads);
}

#define HINT_ELEMENT 16
#define HINT_BODY 6
#define HINT_SEQ_BITS 24
#define HINT_MAX_INDEX ((1LL << 48) - 1)
#define HINT_MAX_WORDS 16 /* replay windows up to 1024 indices */

/* RFC 3711 appendix A: the 48-bit index nearest `highest` (-1: none yet) with these low bits. */
static int64_t estimate_index(int64_t highest, int64_t seq24) {
    if (highest < 0)
        return seq24;
    const int64_t half = 1LL << (HINT_SEQ_BITS - 1);
    int64_t roc = highest >> HINT_SEQ_BITS, s_l = highest & ((1LL << HINT_SEQ_BITS) - 1), v;
    if (s_l < half)
        v = (seq24 - s_l > half && roc > 0) ? roc - 1 : roc;
    else
        v = (s_l - half > seq24) ? roc + 1 : roc;
    int64_t idx = (v << HINT_SEQ_BITS) | seq24;
    return idx > HINT_MAX_INDEX ? HINT_MAX_INDEX : idx;
}

static int window_bit(const uint64_t *m, int64_t d) { return (int)((m[d >> 6] >> (d & 63)) & 1); }

/* mask <<= shift (shift < window), bits at and above `window` cleared */
static void window_shift(uint64_t *m, int words, int64_t shift, int window) {
    int64_t ws = shift >> 6, bs = shift & 63;
    for (int i = words - 1; i >= 0; i--) {
        uint64_t v = 0;
        if (i - ws >= 0) {
            v = m[i - ws] << bs;
            if (bs && i - ws - 1 >= 0)
                v |= m[i - ws - 1] >> (64 - bs);
        }
        m[i] = v;
    }
    if (window & 63)
        m[words - 1] &= (1ULL << (window & 63)) - 1;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len % itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes", name, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* hint_accept(rows, elements, pads, highest, mask, window, n_bw, out_index, out_code) -> None
 *
 * HintVerifier.accept for n hints in arrival order, each a 16-byte element (`elements`: the n
 * elements back to back) of stream table row rows[i] (int64): the 48-bit index estimated from
 * the row's highest accepted one, the tag checked in constant time under the row's pads
 * (uint32 [rows, 16], hint_pads), then the bandwidth field (< n_bw), then the row's replay
 * window (highest: int64 [rows], -1 = nothing accepted yet; mask: uint64 [rows, words], bit d
 * = index highest - d was accepted; `window` indices). An accepted hint moves its row's window
 * (so a later hint of the same row in the same call sees it). Writes out_index (int64 [n]) and
 * out_code (uint8 [n]: 0 accepted, 1 tag, 2 field, 3 replay). */
static PyObject *hint_accept(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "hint_accept(rows, elements, pads, highest, mask, window, n_bw, out_index, out_code)");
        return NULL;
    }
    long window = PyLong_AsLong(args[5]), n_bw = PyLong_AsLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer rows, el, pads, hi, mask, oi, oc;
    if (get_buffer(args[0], &rows, 8, 0, "rows") < 0)
        return NULL;
    if (get_buffer(args[1], &el, HINT_ELEMENT, 0, "elements") < 0)
        goto r0;
    if (get_buffer(args[2], &pads, 64, 0, "pads") < 0)
        goto r1;
    if (get_buffer(args[3], &hi, 8, 1, "highest") < 0)
        goto r2;
    if (get_buffer(args[4], &mask, 8, 1, "mask") < 0)
        goto r3;
    if (get_buffer(args[7], &oi, 8, 1, "out_index") < 0)
        goto r4;
    if (get_buffer(args[8], &oc, 1, 1, "out_code") < 0)
        goto r5;
    Py_ssize_t n = rows.len / 8, cap = hi.len / 8;
    int words = (int)((window + 63) / 64);
    if (window < 1 || words > HINT_MAX_WORDS || el.len != n * HINT_ELEMENT || pads.len != cap * 64
        || mask.len != cap * words * 8 || oi.len != n * 8 || oc.len != n) {
        PyErr_SetString(PyExc_ValueError, "hint_accept: array sizes do not match");
        goto r6;
    }
    const int64_t *r = (const int64_t *)rows.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (r[i] < 0 || r[i] >= cap) {
            PyErr_SetString(PyExc_IndexError, "hint_accept: row out of range");
            goto r6;
        }
    }
    const uint8_t *e = (const uint8_t *)el.buf;
    const uint32_t *pd = (const uint32_t *)pads.buf;
    int64_t *highest = (int64_t *)hi.buf, *out_index = (int64_t *)oi.buf;
    uint64_t *m = (uint64_t *)mask.buf;
    uint8_t *out_code = (uint8_t *)oc.buf;
    for (Py_ssize_t i = 0; i < n; i++, e += HINT_ELEMENT) {
        int64_t row = r[i];
        uint64_t *rm = m + row * words;
        int64_t seq24 = (int64_t)e[3] << 16 | (int64_t)e[4] << 8 | e[5];
        int64_t index = estimate_index(highest[row], seq24);
        uint8_t msg[12], tag[10], diff = 0;
        for (int k = 0; k < 6; k++)
            msg[k] = (uint8_t)(index >> (8 * (5 - k)));
        memcpy(msg + 6, e, HINT_BODY);
        hint_tag(pd + row * 16, msg, tag);
        for (int k = 0; k < 10; k++)
            diff |= tag[k] ^ e[HINT_BODY + k];
        out_index[i] = index;
        if (diff) {
            out_code[i] = 1;
            continue;
        }
        if (((e[0] >> 1) & 0x07) >= n_bw) {
            out_code[i] = 2;
            continue;
        }
        int64_t h = highest[row];
        if (h >= 0 && index <= h) {
            int64_t d = h - index;
            if (d >= window || window_bit(rm, d)) {
                out_code[i] = 3;
                continue;
            }
            rm[d >> 6] |= 1ULL << (d & 63);
        } else if (h < 0 || index - h >= window) {
            memset(rm, 0, (size_t)words * 8);
            rm[0] = 1;
            highest[row] = index;
        } else {
            window_shift(rm, words, index - h, (int)window);
            rm[0] |= 1;
            highest[row] = index;
        }
        out_code[i] = 0;
    }
    PyBuffer_Release(&oc);
    PyBuffer_Release(&oi);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&pads);
    PyBuffer_Release(&el);
    PyBuffer_Release(&rows);
    Py_RETURN_NONE;
r6:
    PyBuffer_Release(&oc);
r5:
    PyBuffer_Release(&oi);
r4:
    PyBuffer_Release(&mask);
r3:
    PyBuffer_Release(&hi);
r2:
    PyBuffer_Release(&pads);
r1:
    PyBuffer_Release(&el);
r0:
    PyBuffer_Release(&rows);
    return NULL;
}

/* hint_sha(use_sha_ni=None) -> str: the compression hint tags use ("sha-ni" or "portable");
 * True/False switches to SHA-NI (ValueError where the CPU lacks it) or the portable code. */
static PyObject *hint_sha(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "hint_sha(use_sha_ni=None)");
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        int want = PyObject_IsTrue(args[0]);
        if (want < 0)
            return NULL;
        if (!want) {
            sha256_compress = sha256_block;
        } else {
#ifdef HAVE_SHA_NI_BUILD
            if (!cpu_has_sha_ni()) {
                PyErr_SetString(PyExc_ValueError, "this CPU has no SHA extensions");
                return NULL;
            }
            sha256_compress = sha256_block_ni;
#else
            PyErr_SetString(PyExc_ValueError, "built without the x86 SHA extensions");
            return NULL;
#endif
        }
    }
#ifdef HAVE_SHA_NI_BUILD
    if (sha256_compress == sha256_block_ni)
        return PyUnicode_FromString("sha-ni");
#endif
    return PyUnicode_FromString("portable");
}

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))send_packet, METH_FASTCALL,
     "send(path, template, b1, seq, timestamp, payload) -> SRTP length, or -errno"},
    {"unprotect", (PyCFunction)(void (*)(void))unprotect_packet, METH_FASTCALL,
     "unprotect(unprotect_fn, srtp, datagram, hint_id) -> (pt, seq, timestamp, payload, hint), "
     "or an int: libsrtp's error status, -1 malformed"},
    {"pack10", (PyCFunction)pack10, METH_O,
     "pack10(int16 codes in wire order) -> bytes of 10-bit fields, MSB first"},
    {"hint_pads", (PyCFunction)hint_pads, METH_O,
     "hint_pads(key) -> the key's HMAC-SHA256 inner and outer midstates (64 bytes)"},
    {"hint_accept", (PyCFunction)(void (*)(void))hint_accept, METH_FASTCALL,
     "hint_accept(rows, elements, pads, highest, mask, window, n_bw, out_index, out_code): "
     "hint_auth.HintVerifier.accept for many hints, columnar"},
    {"hint_sha", (PyCFunction)(void (*)(void))hint_sha, METH_FASTCALL,
     "hint_sha(use_sha_ni=None) -> 'sha-ni' or 'portable': the SHA-256 compression of hint tags"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rtpsend",
    "One RTP packet in C: out (header template, SRTP, sendto) and in (SRTP, header fields).", -1, methods,
};

PyMODINIT_FUNC PyInit__rtpsend(void) {
#ifdef HAVE_SHA_NI_BUILD
    if (cpu_has_sha_ni())
        sha256_compress = sha256_block_ni;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "BUFFER_BYTES", BUFFER_BYTES) < 0
                      || PyModule_AddIntConstant(m, "SRTP_MAX_TRAILER", SRTP_MAX_TRAILER) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
