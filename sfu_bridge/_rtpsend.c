/* sfu_bridge._rtpsend: one outbound RTP packet - header template, SRTP, sendto - in C.
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

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))send_packet, METH_FASTCALL,
     "send(path, template, b1, seq, timestamp, payload) -> SRTP length, or -errno"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rtpsend",
    "One outbound RTP packet - header template, SRTP, sendto - in C (fastpath.py).", -1, methods,
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
