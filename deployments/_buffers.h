/* Buffer access shared by the project's array loops in C (deployments/_columns.c,
 * sfu_bridge/_tick.c): numpy arrays taken through the buffer protocol, C-contiguous, with
 * their element size checked, and released together. */
#ifndef AURALINK_BUFFERS_H
#define AURALINK_BUFFERS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void release_all(Buf *b, int n) {
    for (int i = 0; i < n; i++)
        if (b[i].held) {
            PyBuffer_Release(&b[i].view);
            b[i].held = 0;
        }
}

/* A C-contiguous buffer of `item`-byte elements; writable when asked. */
static int get(PyObject *obj, Buf *b, Py_ssize_t item, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0)
        return -1;
    b->held = 1;
    if (b->view.itemsize != item || b->view.len % item) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte elements", name, item);
        return -1;
    }
    return 0;
}

#endif
