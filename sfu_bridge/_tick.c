/* The bridge core's per-tick loops in C (core.py): its per-row chunk queue (q_n, q_head,
 * q_ts) and the grouping of a tick's hints by stream.
 *
 * Each tick a bridge core takes one chunk from every row with a chunk queued, its publishers
 * push one chunk to every live row, and its hints are grouped by stream three times. With
 * numpy each is a handful of array operations, and each costs microseconds after the process
 * wakes; these loops do the same in one pass. Each does exactly what its numpy version in
 * core.py does (integers only), and tests/sfu_bridge/test_tick.py holds them to it.
 * Optional: without a C compiler the numpy versions run.
 *
 *   ring_push(rows, ts, q_n, q_head, q_ts, depth) -> 0, or -1 when a row is full (nothing
 *       done: the caller spills its oldest chunk first)
 *   ring_rows(q_n, top, max_backlog, out_rows) -> (rows with a chunk queued, any beyond
 *       max_backlog)
 *   ring_pop(rows, q_n, q_head, q_ts, depth, out_head, out_ts): each row's oldest chunk
 *       taken (its ring slot in out_head, its timestamp in out_ts)
 *
 *   group_ranks(rows, scratch, out_uniq, out_inv, out_counts, out_rank) -> distinct rows:
 *       core._ranks (scratch: 2 x len(rows) int64)
 *   by_owner(rows, owner, out_rows) -> 0: the rows in out_rows, stably ordered by
 *       owner[row] (the replica each stream's frames go to); -1: a row's owner is not known,
 *       -2: more than 64 owners (nothing written: the caller's numpy sort)
 *   tally_frames(rows, codes, counts, tally, dtx_code): a tick's outcomes counted, by code
 *       (counts) and by row and code (tally [rows x dtx_code]; rows < 0 and DTX frames not)
 *
 * All arrays are C-contiguous int64 (codes: uint8); q_ts is [rows x depth]; the ring's rows distinct and in
 * range.
 */
#include "_buffers.h" /* deployments/_buffers.h (setup.py's include_dirs) */

#include <stdint.h>
#include <string.h>

/* an int64 array */
static int get64(PyObject *obj, Buf *b, int writable, const char *name) { return get(obj, b, 8, writable, name); }

#define N(b) ((b).view.len / 8)

/* rows in [0, cap) */
static int rows_ok(const int64_t *rows, Py_ssize_t n, Py_ssize_t cap) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= cap) {
            PyErr_SetString(PyExc_IndexError, "a row outside the stream table");
            return 0;
        }
    return 1;
}

static PyObject *ring_push(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "ring_push(rows, ts, q_n, q_head, q_ts, depth)");
        return NULL;
    }
    Py_ssize_t depth = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[5];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    static const char *names[] = {"rows", "ts", "q_n", "q_head", "q_ts"};
    for (int i = 0; i < 5; i++)
        if (get64(args[i], &b[i], i >= 2, names[i]) < 0)
            goto done;
    Py_ssize_t n = N(b[0]), cap = N(b[2]);
    if (depth < 1 || N(b[1]) != n || N(b[3]) != cap || N(b[4]) != cap * depth) {
        PyErr_SetString(PyExc_ValueError, "ring_push: lengths differ");
        goto done;
    }
    const int64_t *rows = b[0].view.buf, *ts = b[1].view.buf;
    int64_t *q_n = b[2].view.buf, *q_head = b[3].view.buf, *q_ts = b[4].view.buf;
    if (!rows_ok(rows, n, cap))
        goto done;
    for (Py_ssize_t i = 0; i < n; i++)
        if (q_n[rows[i]] >= depth) { /* full: the caller spills first */
            result = PyLong_FromLong(-1);
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        int64_t slot = (q_head[r] + q_n[r]) % depth;
        q_ts[r * depth + slot] = ts[i];
        q_n[r] += 1;
    }
    result = PyLong_FromLong(0);
done:
    release_all(b, 5);
    return result;
}

static PyObject *ring_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "ring_rows(q_n, top, max_backlog, out_rows)");
        return NULL;
    }
    Py_ssize_t top = PyLong_AsSsize_t(args[1]);
    int64_t max_backlog = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[2];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get64(args[0], &b[0], 0, "q_n") < 0 || get64(args[3], &b[1], 1, "out_rows") < 0)
        goto done;
    if (top < 0 || top > N(b[0]) || N(b[1]) < top) {
        PyErr_SetString(PyExc_ValueError, "ring_rows: top beyond q_n or out_rows");
        goto done;
    }
    const int64_t *q_n = b[0].view.buf;
    int64_t *out = b[1].view.buf;
    Py_ssize_t m = 0;
    int over = 0;
    for (Py_ssize_t r = 0; r < top; r++)
        if (q_n[r]) {
            out[m++] = r;
            over |= q_n[r] > max_backlog;
        }
    result = Py_BuildValue("(nO)", m, over ? Py_True : Py_False);
done:
    release_all(b, 2);
    return result;
}

static PyObject *ring_pop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "ring_pop(rows, q_n, q_head, q_ts, depth, out_head, out_ts)");
        return NULL;
    }
    Py_ssize_t depth = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[6];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    static const char *names[] = {"rows", "q_n", "q_head", "q_ts", "out_head", "out_ts"};
    static const int at[] = {0, 1, 2, 3, 5, 6};
    for (int i = 0; i < 6; i++)
        if (get64(args[at[i]], &b[i], i >= 1 && i != 3, names[i]) < 0)
            goto done;
    Py_ssize_t n = N(b[0]), cap = N(b[1]);
    if (depth < 1 || N(b[2]) != cap || N(b[3]) != cap * depth || N(b[4]) != n || N(b[5]) != n) {
        PyErr_SetString(PyExc_ValueError, "ring_pop: lengths differ");
        goto done;
    }
    const int64_t *rows = b[0].view.buf, *q_ts = b[3].view.buf;
    int64_t *q_n = b[1].view.buf, *q_head = b[2].view.buf, *out_head = b[4].view.buf,
            *out_ts = b[5].view.buf;
    if (!rows_ok(rows, n, cap))
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = rows[i], h = q_head[r];
        if (h < 0 || h >= depth) {
            PyErr_SetString(PyExc_IndexError, "ring_pop: a head outside the ring");
            goto done;
        }
        out_head[i] = h;
        out_ts[i] = q_ts[r * depth + h];
        q_head[r] = (h + 1) % depth;
        q_n[r] -= 1;
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, 6);
    return result;
}

/* Stable merge sort of idx[0..n) by key[idx]; tmp holds n. */
static void sort_by_key(int64_t *idx, int64_t *tmp, const int64_t *key, Py_ssize_t n) {
    int64_t *src = idx, *dst = tmp;
    for (Py_ssize_t w = 1; w < n; w *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * w) {
            Py_ssize_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            Py_ssize_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = key[src[j]] < key[src[i]] ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        int64_t *s = src;
        src = dst;
        dst = s;
    }
    if (src != idx)
        memcpy(idx, src, (size_t)n * sizeof *idx);
}

static PyObject *group_ranks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "group_ranks(rows, scratch, out_uniq, out_inv, out_counts, out_rank)");
        return NULL;
    }
    Buf b[6];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    static const char *names[] = {"rows", "scratch", "out_uniq", "out_inv", "out_counts", "out_rank"};
    for (int i = 0; i < 6; i++)
        if (get64(args[i], &b[i], i >= 1, names[i]) < 0)
            goto done;
    Py_ssize_t n = N(b[0]);
    if (N(b[1]) < 2 * n || N(b[2]) < n || N(b[3]) != n || N(b[4]) < n || N(b[5]) != n) {
        PyErr_SetString(PyExc_ValueError, "group_ranks: buffers too short");
        goto done;
    }
    const int64_t *rows = b[0].view.buf;
    int64_t *order = b[1].view.buf, *tmp = order + n, *uniq = b[2].view.buf, *inv = b[3].view.buf,
            *counts = b[4].view.buf, *rank = b[5].view.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        order[i] = i;
    sort_by_key(order, tmp, rows, n); /* the entries by row, in array order within a row */
    Py_ssize_t g = -1, start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t e = order[i];
        if (i == 0 || rows[e] != rows[order[i - 1]]) {
            if (g >= 0)
                counts[g] = i - start;
            uniq[++g] = rows[e];
            start = i;
        }
        inv[e] = g;
        rank[e] = i - start;
    }
    if (g >= 0)
        counts[g] = n - start;
    result = PyLong_FromSsize_t(g + 1);
done:
    release_all(b, 6);
    return result;
}

static PyObject *tally_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "tally_frames(rows, codes, counts, tally, dtx_code)");
        return NULL;
    }
    long dtx = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[4];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get64(args[0], &b[0], 0, "rows") < 0)
        goto done;
    if (get(args[1], &b[1], 1, 0, "codes") < 0)
        goto done;
    if (get64(args[2], &b[2], 1, "counts") < 0 || get64(args[3], &b[3], 1, "tally") < 0)
        goto done;
    Py_ssize_t n = N(b[0]), n_counts = N(b[2]);
    if (dtx < 1 || b[1].view.len != n || N(b[3]) % dtx) {
        PyErr_SetString(PyExc_ValueError, "tally_frames: lengths differ");
        goto done;
    }
    Py_ssize_t tally_rows = N(b[3]) / dtx;
    const int64_t *rows = b[0].view.buf;
    const uint8_t *codes = b[1].view.buf;
    int64_t *counts = b[2].view.buf, *tally = b[3].view.buf;
    for (Py_ssize_t i = 0; i < n; i++) /* checked first: nothing counted from a bad tick */
        if (codes[i] >= n_counts || rows[i] >= tally_rows) {
            PyErr_SetString(PyExc_IndexError, "tally_frames: a code or row outside the tables");
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        counts[codes[i]] += 1;
        if (rows[i] >= 0 && codes[i] != dtx)
            tally[rows[i] * dtx + codes[i]] += 1;
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, 4);
    return result;
}

#define MAX_OWNERS 64

static PyObject *by_owner(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "by_owner(rows, owner, out_rows)");
        return NULL;
    }
    Buf b[3];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get64(args[0], &b[0], 0, "rows") < 0 || get64(args[1], &b[1], 0, "owner") < 0
        || get64(args[2], &b[2], 1, "out_rows") < 0)
        goto done;
    Py_ssize_t n = N(b[0]), cap = N(b[1]);
    if (N(b[2]) != n) {
        PyErr_SetString(PyExc_ValueError, "by_owner: lengths differ");
        goto done;
    }
    const int64_t *rows = b[0].view.buf, *owner = b[1].view.buf;
    int64_t *out = b[2].view.buf;
    if (!rows_ok(rows, n, cap))
        goto done;
    Py_ssize_t at[MAX_OWNERS + 1] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t o = owner[rows[i]];
        if (o < 0) {
            result = PyLong_FromLong(-1);
            goto done;
        }
        if (o >= MAX_OWNERS) {
            result = PyLong_FromLong(-2);
            goto done;
        }
        at[o + 1]++;
    }
    for (int o = 0; o < MAX_OWNERS; o++) /* where each owner's rows start */
        at[o + 1] += at[o];
    for (Py_ssize_t i = 0; i < n; i++)
        out[at[owner[rows[i]]]++] = rows[i];
    result = PyLong_FromLong(0);
done:
    release_all(b, 3);
    return result;
}

static PyMethodDef methods[] = {
    {"ring_push", (PyCFunction)(void (*)(void))ring_push, METH_FASTCALL,
     "core.BridgeCore._push without audio: one chunk timestamp per row; -1 if a row is full"},
    {"ring_rows", (PyCFunction)(void (*)(void))ring_rows, METH_FASTCALL,
     "rows of q_n[:top] with a chunk queued, and whether any holds more than max_backlog"},
    {"ring_pop", (PyCFunction)(void (*)(void))ring_pop, METH_FASTCALL,
     "each row's oldest chunk taken from the ring: its slot and timestamp"},
    {"group_ranks", (PyCFunction)(void (*)(void))group_ranks, METH_FASTCALL,
     "core._ranks: distinct rows, each entry's group, the groups' sizes, each entry's rank in it"},
    {"by_owner", (PyCFunction)(void (*)(void))by_owner, METH_FASTCALL,
     "rows stably ordered by their owning replica; -1 if one is unknown, -2 beyond 64 owners"},
    {"tally_frames", (PyCFunction)(void (*)(void))tally_frames, METH_FASTCALL,
     "core.BridgeCore._finish's tallies: frames by code, and by row and code but DTX"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tick", "The bridge core's per-tick loops in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__tick(void) { return PyModule_Create(&module); }
