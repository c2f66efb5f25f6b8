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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
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

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))send_packet, METH_FASTCALL,
     "send(path, template, b1, seq, timestamp, payload) -> SRTP length, or -errno"},
    {"unprotect", (PyCFunction)(void (*)(void))unprotect_packet, METH_FASTCALL,
     "unprotect(unprotect_fn, srtp, datagram, hint_id) -> (pt, seq, timestamp, payload, hint), "
     "or an int: libsrtp's error status, -1 malformed"},
    {"pack10", (PyCFunction)pack10, METH_O,
     "pack10(int16 codes in wire order) -> bytes of 10-bit fields, MSB first"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rtpsend",
    "One RTP packet in C: out (header template, SRTP, sendto) and in (SRTP, header fields).", -1, methods,
};

PyMODINIT_FUNC PyInit__rtpsend(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "BUFFER_BYTES", BUFFER_BYTES) < 0
                      || PyModule_AddIntConstant(m, "SRTP_MAX_TRAILER", SRTP_MAX_TRAILER) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
