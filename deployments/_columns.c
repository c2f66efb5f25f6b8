/* The codec replica's per-step loops over its stream columns, in C.
 *
 * A replica step runs many short array operations over a few thousand streams' columns.
 * Between steps the replica sleeps (for the next request, for the model), and each operation
 * after a wake costs several microseconds however few elements it touches; one loop here
 * replaces a few dozen of them. Each function does exactly what its numpy version beside it
 * does, operation by operation and in the same order (so the same IEEE results), and
 * tests/deployments/test_columns.py holds them to it. The module is optional: without a C
 * compiler the numpy versions run.
 *
 * arrivals.py `ArrivalForecast`:
 *   forecast_observe(keys, arrival, deadlines, known, last, budget, presence, next,
 *                    period, keep, alpha) -> 0, or the capacity the keys need (nothing done)
 *   forecast_expected(known, last, budget, presence, next, now, limit, grace, quiet_s,
 *                     now_less_grace, period, exclude, scratch, out_keys, out_values)
 *                     -> frames (scratch: 4 x len(known) int64, the caller's to reuse)
 *
 * scheduler.py `EdfScheduler.add_many`:
 *   queue_add(keys, epochs, seqs, refs, deadlines, take, start, arrival, default_deadline,
 *             out_deadlines, out_budgets_ms, dl, arr, key, ep, sq, ref, live, kq)
 *             -> 0, or the length kq needs (the queue's columns untouched)
 *
 *   queue_remove(idx, live, key, kq): the frames at columns idx (distinct, live) leave the
 *             queue (`EdfScheduler._remove`)
 *
 * replica.py `SlotPool.lookup_refs` (a sender's stream refs -> the streams' slots):
 *   ref_lookup(refs, t_ref, t_slot, t_slot_gen, generation, out_slots, out_hit, out_found)
 *             -> streams found (their places in out_found; -1 in out_slots for the others)
 *
 * replica.py `CodecReplicaCore._answer_step` and `_record_recent` (a finished step's frames):
 *   step_slack(deadlines, rows, end, recent_missed, recent_slack, at, out_slack)
 *             -> frames late: each frame's slack (ms) to its deadline, into the ring of recent
 *             frames from `at` on (only the last len(ring) of them when more)
 *
 * replica.py `SlotPool.distinct` (a request's streams, by their slots):
 *   slots_distinct(slots, mark, stamp) -> -1 when a slot (>= 0) is named twice, else how
 *             many slots are -1 (unknown streams, compared by id by the caller). mark: int64,
 *             one per slot, the caller's; a slot is marked with `stamp`, which must be new
 *             (greater than any mark) each call, so the marks never need clearing.
 *
 * contract.py `FrameBatch.validate` (the value checks of a request's usual columns):
 *   batch_values(budgets_ms, n_q, n_q_ok, refs, max_ref_rows)
 *             -> 0, or the first check failed: 1 a budget is infinite, 2 a depth is not valid
 *             (n_q_ok[depth] false, or outside it), 3 a ref is negative or its row (ref >> 32)
 *             is max_ref_rows or more. budgets_ms float64, n_q and refs int64 or None,
 *             n_q_ok one byte per depth.
 *
 * Arrays are C-contiguous buffers: keys and out_keys int64, known and exclude one byte per
 * key (numpy bool), the others float64 (queue_add: keys, epochs, seqs, refs, key, ep, sq,
 * ref and kq int64, live one byte; ref_lookup: all int64 but out_hit, one byte).
 * Floating-point contraction is off (setup.py), so a * b + c rounds twice, as numpy's two
 * operations do.
 */
#include "_buffers.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N(b, item) ((b).view.len / (item))

static PyObject *forecast_observe(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "forecast_observe(keys, arrival, deadlines, known, last, budget, "
                                         "presence, next, period, keep, alpha)");
        return NULL;
    }
    double arrival = PyFloat_AsDouble(args[1]);
    double period = PyFloat_AsDouble(args[8]), keep = PyFloat_AsDouble(args[9]);
    double alpha = PyFloat_AsDouble(args[10]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[7];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(args[0], &b[0], 8, 0, "keys") < 0 || get(args[2], &b[1], 8, 0, "deadlines") < 0
        || get(args[3], &b[2], 1, 1, "known") < 0 || get(args[4], &b[3], 8, 1, "last") < 0
        || get(args[5], &b[4], 8, 1, "budget") < 0 || get(args[6], &b[5], 8, 1, "presence") < 0
        || get(args[7], &b[6], 8, 1, "next") < 0)
        goto done;
    Py_ssize_t n = N(b[0], 8), cap = N(b[2], 1);
    if (N(b[1], 8) != n || N(b[3], 8) != cap || N(b[4], 8) != cap || N(b[5], 8) != cap
        || N(b[6], 8) != cap) {
        PyErr_SetString(PyExc_ValueError, "forecast_observe: column lengths differ");
        goto done;
    }
    const int64_t *keys = b[0].view.buf;
    const double *deadlines = b[1].view.buf;
    uint8_t *known = b[2].view.buf;
    double *last = b[3].view.buf, *budget = b[4].view.buf, *presence = b[5].view.buf,
           *next = b[6].view.buf;
    int64_t top = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (keys[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "forecast_observe: keys must be >= 0");
            goto done;
        }
        if (keys[i] + 1 > top)
            top = keys[i] + 1;
    }
    if (top > cap) { /* the caller grows the columns and calls again */
        result = PyLong_FromLongLong(top);
        goto done;
    }
    const double half = 0.5 * period;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t k = keys[i];
        double bud = deadlines[i] - arrival;
        if (!known[k]) {
            known[k] = 1;
            last[k] = arrival;
            budget[k] = bud;
            presence[k] = 1.0;
            next[k] = arrival + period;
            continue;
        }
        double gap = arrival - last[k];
        if (!(gap >= half)) /* the same tick: the forecast stands */
            continue;
        double p = presence[k];
        double ticks = rint(gap / period);
        if (ticks > 1)
            p *= pow(keep, ticks - 1.0);
        presence[k] = p * keep + alpha;
        last[k] = arrival;
        budget[k] = bud;
        next[k] = arrival + period;
    }
    result = PyLong_FromLong(0);
done:
    release_all(b, 7);
    return result;
}

typedef struct {
    double t;
    int64_t k;
} Frame;

/* (t, k) order: by time, then by key (the numpy version's stable sort of keys taken in
 * increasing order). */
static int before(const Frame *a, const Frame *b) { return a->t < b->t || (a->t == b->t && a->k < b->k); }

/* Bottom-up merge sort of f[0..n) using tmp[0..n); the result ends in f. */
static void merge_sort(Frame *f, Frame *tmp, Py_ssize_t n) {
    Frame *src = f, *dst = tmp;
    for (Py_ssize_t w = 1; w < n; w *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * w) {
            Py_ssize_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            Py_ssize_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = before(&src[j], &src[i]) ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        Frame *s = src;
        src = dst;
        dst = s;
    }
    if (src != f)
        memcpy(f, src, (size_t)n * sizeof *f);
}

#define FEW_TIMES 16

/* Stable sort by t of f[0..n) (keys increasing within equal times, as given), into tmp.
 * The frames expected of a replica's streams share a few times (one per request they came
 * in): then one counting pass; otherwise a merge sort. */
static void sort_frames(Frame *f, Frame *tmp, Py_ssize_t n) {
    double times[FEW_TIMES];
    Py_ssize_t count[FEW_TIMES] = {0};
    int nt = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int j = 0;
        while (j < nt && times[j] != f[i].t)
            j++;
        if (j == nt) {
            if (nt == FEW_TIMES || isnan(f[i].t)) {
                merge_sort(f, tmp, n);
                memcpy(tmp, f, (size_t)n * sizeof *f);
                return;
            }
            times[nt++] = f[i].t;
        }
        count[j]++;
    }
    /* where each time's frames start: the times in increasing order */
    Py_ssize_t at[FEW_TIMES];
    for (int j = 0; j < nt; j++) {
        Py_ssize_t pos = 0;
        for (int q = 0; q < nt; q++)
            if (times[q] < times[j])
                pos += count[q];
        at[j] = pos;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int j = 0;
        while (times[j] != f[i].t)
            j++;
        tmp[at[j]++] = f[i];
    }
}

static PyObject *forecast_expected(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "forecast_expected(known, last, budget, presence, next, now, limit, "
                                         "grace, quiet_s, now_less_grace, period, exclude, scratch, out_keys, "
                                         "out_values)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[5]), limit = PyFloat_AsDouble(args[6]);
    double grace = PyFloat_AsDouble(args[7]), quiet_s = PyFloat_AsDouble(args[8]);
    double now_less_grace = PyFloat_AsDouble(args[9]), period = PyFloat_AsDouble(args[10]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[9];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(args[0], &b[0], 1, 1, "known") < 0 || get(args[1], &b[1], 8, 0, "last") < 0
        || get(args[2], &b[2], 8, 0, "budget") < 0 || get(args[3], &b[3], 8, 0, "presence") < 0
        || get(args[4], &b[4], 8, 1, "next") < 0 || get(args[12], &b[6], 8, 1, "scratch") < 0
        || get(args[13], &b[7], 8, 1, "out_keys") < 0 || get(args[14], &b[8], 8, 1, "out_values") < 0)
        goto done;
    if (args[11] != Py_None && get(args[11], &b[5], 1, 0, "exclude") < 0)
        goto done;
    Py_ssize_t cap = N(b[0], 1);
    if (N(b[1], 8) != cap || N(b[2], 8) != cap || N(b[3], 8) != cap || N(b[4], 8) != cap
        || N(b[6], 8) < 4 * cap || N(b[7], 8) < cap || N(b[8], 8) < 4 * cap) {
        PyErr_SetString(PyExc_ValueError, "forecast_expected: column lengths differ or buffers too short");
        goto done;
    }
    uint8_t *known = b[0].view.buf;
    const double *last = b[1].view.buf, *budget = b[2].view.buf, *presence = b[3].view.buf;
    double *next = b[4].view.buf;
    const uint8_t *exclude = b[5].held ? b[5].view.buf : NULL;
    Py_ssize_t n_exclude = b[5].held ? N(b[5], 1) : 0;
    Frame *f = b[6].view.buf, *sorted = f + cap; /* scratch: 2 x cap frames of 16 bytes */
    Py_ssize_t m = 0;
    for (Py_ssize_t k = 0; k < cap; k++) {
        if (!known[k] || !(next[k] <= limit))
            continue;
        if (next[k] + grace <= now) { /* its tick passed without its chunk */
            if (now - last[k] > quiet_s) { /* gone quiet for good */
                known[k] = 0;
                continue;
            }
            double skip = floor((now_less_grace - next[k]) / period) + 1;
            if (!(skip >= 1.0)) /* np.maximum(1.0, skip) */
                skip = isnan(skip) ? skip : 1.0;
            next[k] += skip * period;
            if (!(next[k] <= limit))
                continue;
        }
        if (exclude != NULL && k < n_exclude && exclude[k])
            continue;
        f[m].t = next[k];
        f[m].k = k;
        m++;
    }
    sort_frames(f, sorted, m);
    int64_t *out_keys = b[7].view.buf;
    double *arrival = b[8].view.buf, *deadline = arrival + m, *weight = deadline + m, *due_by = weight + m;
    for (Py_ssize_t i = 0; i < m; i++) {
        double t = sorted[i].t;
        int64_t k = sorted[i].k;
        out_keys[i] = k;
        arrival[i] = (t >= now || isnan(t)) ? t : now; /* np.maximum(t, now) */
        deadline[i] = t + budget[k];
        weight[i] = presence[k];
        due_by[i] = t + grace;
    }
    result = PyLong_FromSsize_t(m);
done:
    release_all(b, 9);
    return result;
}

static PyObject *queue_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 19) {
        PyErr_SetString(PyExc_TypeError, "queue_add(keys, epochs, seqs, refs, deadlines, take, start, arrival, "
                                         "default_deadline, out_deadlines, out_budgets_ms, dl, arr, key, ep, sq, "
                                         "ref, live, kq)");
        return NULL;
    }
    Py_ssize_t take = PyLong_AsSsize_t(args[5]), start = PyLong_AsSsize_t(args[6]);
    double arrival = PyFloat_AsDouble(args[7]), fallback = PyFloat_AsDouble(args[8]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[15];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    static const char *names[] = {"keys", "epochs", "seqs", "refs", "deadlines", "out_deadlines",
                                  "out_budgets_ms", "dl", "arr", "key", "ep", "sq", "ref", "live", "kq"};
    static const int at[] = {0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18};
    for (int i = 0; i < 15; i++)
        if (get(args[at[i]], &b[i], i == 13 ? 1 : 8, i >= 5, names[i]) < 0)
            goto done;
    Py_ssize_t n = N(b[0], 8), cap = N(b[13], 1), nkq = N(b[14], 8);
    for (int i = 1; i < 7; i++)
        if (N(b[i], 8) != n) {
            PyErr_Format(PyExc_ValueError, "queue_add: %s has another length than keys", names[i]);
            goto done;
        }
    for (int i = 7; i < 13; i++)
        if (N(b[i], 8) != cap) {
            PyErr_Format(PyExc_ValueError, "queue_add: column %s has another length than live", names[i]);
            goto done;
        }
    if (take < 0 || take > n || start < 0 || start + take > cap) {
        PyErr_SetString(PyExc_ValueError, "queue_add: take/start outside the columns");
        goto done;
    }
    const int64_t *keys = b[0].view.buf, *epochs = b[1].view.buf, *seqs = b[2].view.buf,
                  *refs = b[3].view.buf;
    const double *deadlines = b[4].view.buf;
    double *out_dl = b[5].view.buf, *out_budget = b[6].view.buf;
    /* every frame: a deadline of its own, else the default; its budget on arrival */
    for (Py_ssize_t i = 0; i < n; i++) {
        double d = isfinite(deadlines[i]) ? deadlines[i] : fallback;
        out_dl[i] = d;
        out_budget[i] = (d - arrival) * 1000.0;
    }
    int64_t top = 0;
    for (Py_ssize_t i = 0; i < take; i++) {
        if (keys[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "queue_add: keys must be >= 0");
            goto done;
        }
        if (keys[i] + 1 > top)
            top = keys[i] + 1;
    }
    if (top > nkq) { /* the caller grows kq and calls again */
        result = PyLong_FromLongLong(top);
        goto done;
    }
    double *dl = b[7].view.buf, *arr = b[8].view.buf;
    int64_t *key = b[9].view.buf, *ep = b[10].view.buf, *sq = b[11].view.buf, *ref = b[12].view.buf,
            *kq = b[14].view.buf;
    uint8_t *live = b[13].view.buf;
    for (Py_ssize_t i = 0; i < take; i++) { /* the kept frames: the queue's next columns */
        Py_ssize_t c = start + i;
        dl[c] = out_dl[i];
        arr[c] = arrival;
        key[c] = keys[i];
        ep[c] = epochs[i];
        sq[c] = seqs[i];
        ref[c] = refs[i];
        live[c] = 1;
        kq[keys[i]] += 1;
    }
    result = PyLong_FromLong(0);
done:
    release_all(b, 15);
    return result;
}

static PyObject *ref_lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "ref_lookup(refs, t_ref, t_slot, t_slot_gen, generation, out_slots, out_hit, out_found)");
        return NULL;
    }
    Buf b[8];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    static const char *names[] = {"refs", "t_ref", "t_slot", "t_slot_gen", "generation", "out_slots",
                                  "out_hit", "out_found"};
    for (int i = 0; i < 8; i++)
        if (get(args[i], &b[i], i == 6 ? 1 : 8, i >= 5, names[i]) < 0)
            goto done;
    Py_ssize_t n = N(b[0], 8), rows = N(b[1], 8), cap = N(b[4], 8);
    if (N(b[2], 8) != rows || N(b[3], 8) != rows || rows < 1 || N(b[5], 8) != n || N(b[6], 1) != n
        || N(b[7], 8) != n) {
        PyErr_SetString(PyExc_ValueError, "ref_lookup: lengths differ");
        goto done;
    }
    const int64_t *refs = b[0].view.buf, *t_ref = b[1].view.buf, *t_slot = b[2].view.buf,
                  *t_gen = b[3].view.buf, *generation = b[4].view.buf;
    int64_t *slots = b[5].view.buf, *found = b[7].view.buf;
    uint8_t *hit = b[6].view.buf;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t row = refs[i] >> 32;
        int64_t at = row < rows - 1 ? row : rows - 1; /* np.minimum(rows, size - 1) */
        if (at < 0) {
            PyErr_SetString(PyExc_ValueError, "ref_lookup: refs must be >= 0");
            goto done;
        }
        int64_t slot = t_slot[at];
        if (slot < 0 || slot >= cap) {
            PyErr_SetString(PyExc_IndexError, "ref_lookup: a remembered slot outside the pool");
            goto done;
        }
        int ok = row < rows && t_ref[at] == refs[i] && generation[slot] == t_gen[at];
        hit[i] = (uint8_t)ok;
        slots[i] = ok ? slot : -1;
        if (ok)
            found[k++] = i;
    }
    result = PyLong_FromSsize_t(k);
done:
    release_all(b, 8);
    return result;
}

static PyObject *step_slack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "step_slack(deadlines, rows, end, recent_missed, recent_slack, at, out_slack)");
        return NULL;
    }
    double end = PyFloat_AsDouble(args[2]);
    Py_ssize_t at = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[5];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(args[0], &b[0], 8, 0, "deadlines") < 0 || get(args[1], &b[1], 8, 0, "rows") < 0
        || get(args[3], &b[2], 1, 1, "recent_missed") < 0 || get(args[4], &b[3], 8, 1, "recent_slack") < 0
        || get(args[6], &b[4], 8, 1, "out_slack") < 0)
        goto done;
    Py_ssize_t n_dl = N(b[0], 8), n = N(b[1], 8), window = N(b[2], 1);
    if (N(b[3], 8) != window || window < 1 || at < 0 || at >= window || N(b[4], 8) != n) {
        PyErr_SetString(PyExc_ValueError, "step_slack: lengths differ or the ring position is outside it");
        goto done;
    }
    const double *deadlines = b[0].view.buf;
    const int64_t *rows = b[1].view.buf;
    uint8_t *missed = b[2].view.buf;
    double *ring = b[3].view.buf, *slack = b[4].view.buf;
    Py_ssize_t late = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= n_dl) {
            PyErr_SetString(PyExc_IndexError, "step_slack: a row outside the request");
            goto done;
        }
        slack[i] = (deadlines[rows[i]] - end) * 1000.0;
        late += slack[i] < 0;
    }
    for (Py_ssize_t i = n > window ? n - window : 0, j = at; i < n; i++) {
        missed[j] = slack[i] < 0;
        ring[j] = slack[i];
        if (++j == window)
            j = 0;
    }
    result = PyLong_FromSsize_t(late);
done:
    release_all(b, 5);
    return result;
}

static PyObject *queue_remove(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "queue_remove(idx, live, key, kq)");
        return NULL;
    }
    Buf b[4];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(args[0], &b[0], 8, 0, "idx") < 0 || get(args[1], &b[1], 1, 1, "live") < 0
        || get(args[2], &b[2], 8, 0, "key") < 0 || get(args[3], &b[3], 8, 1, "kq") < 0)
        goto done;
    Py_ssize_t n = N(b[0], 8), cap = N(b[1], 1), nkq = N(b[3], 8);
    if (N(b[2], 8) != cap) {
        PyErr_SetString(PyExc_ValueError, "queue_remove: columns differ");
        goto done;
    }
    const int64_t *idx = b[0].view.buf, *key = b[2].view.buf;
    uint8_t *live = b[1].view.buf;
    int64_t *kq = b[3].view.buf;
    for (Py_ssize_t i = 0; i < n; i++) /* checked first: a bad call changes nothing */
        if (idx[i] < 0 || idx[i] >= cap || key[idx[i]] < 0 || key[idx[i]] >= nkq) {
            PyErr_SetString(PyExc_IndexError, "queue_remove: a column or key outside the queue");
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        live[idx[i]] = 0;
        kq[key[idx[i]]] -= 1;
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, 4);
    return result;
}

static PyObject *slots_distinct(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "slots_distinct(slots, mark, stamp)");
        return NULL;
    }
    int64_t stamp = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[2];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    if (get(args[0], &b[0], 8, 0, "slots") < 0 || get(args[1], &b[1], 8, 1, "mark") < 0)
        goto done;
    const int64_t *slots = b[0].view.buf;
    int64_t *mark = b[1].view.buf;
    Py_ssize_t n = N(b[0], 8), cap = N(b[1], 8), unknown = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (slots[i] >= cap || slots[i] < -1) {
            PyErr_SetString(PyExc_IndexError, "slots_distinct: a slot outside the pool");
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        if (s < 0) {
            unknown++;
        } else if (mark[s] == stamp) {
            unknown = -1;
            break;
        } else {
            mark[s] = stamp;
        }
    }
    result = PyLong_FromSsize_t(unknown);
done:
    release_all(b, 2);
    return result;
}

static PyObject *batch_values(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "batch_values(budgets_ms, n_q, n_q_ok, refs, max_ref_rows)");
        return NULL;
    }
    int64_t max_rows = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Buf b[4];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    int has_nq = args[1] != Py_None, has_refs = args[3] != Py_None;
    if (get(args[0], &b[0], 8, 0, "budgets_ms") < 0 || (has_nq && get(args[1], &b[1], 8, 0, "n_q") < 0)
        || get(args[2], &b[2], 1, 0, "n_q_ok") < 0 || (has_refs && get(args[3], &b[3], 8, 0, "refs") < 0))
        goto done;
    long code = 0;
    const double *budgets = b[0].view.buf;
    for (Py_ssize_t i = 0, n = N(b[0], 8); i < n; i++)
        if (isinf(budgets[i])) {
            code = 1;
            goto answer;
        }
    if (has_nq) {
        const int64_t *nq = b[1].view.buf;
        const uint8_t *ok = b[2].view.buf;
        Py_ssize_t n_ok = N(b[2], 1);
        for (Py_ssize_t i = 0, n = N(b[1], 8); i < n; i++)
            if (nq[i] < 0 || nq[i] >= n_ok || !ok[nq[i]]) {
                code = 2;
                goto answer;
            }
    }
    if (has_refs) {
        const int64_t *refs = b[3].view.buf;
        for (Py_ssize_t i = 0, n = N(b[3], 8); i < n; i++)
            if (refs[i] < 0 || (refs[i] >> 32) >= max_rows) {
                code = 3;
                goto answer;
            }
    }
answer:
    result = PyLong_FromLong(code);
done:
    release_all(b, 4);
    return result;
}

static PyMethodDef methods[] = {
    {"forecast_observe", (PyCFunction)(void (*)(void))forecast_observe, METH_FASTCALL,
     "arrivals.ArrivalForecast.observe over the forecast's columns; 0, or the capacity needed"},
    {"forecast_expected", (PyCFunction)(void (*)(void))forecast_expected, METH_FASTCALL,
     "arrivals.ArrivalForecast.expected over the forecast's columns; the number of frames written"},
    {"queue_add", (PyCFunction)(void (*)(void))queue_add, METH_FASTCALL,
     "scheduler.EdfScheduler.add_many's column writes; 0, or the length kq needs"},
    {"ref_lookup", (PyCFunction)(void (*)(void))ref_lookup, METH_FASTCALL,
     "replica.SlotPool.lookup_refs's array part: the slots its refs find; the number found"},
    {"step_slack", (PyCFunction)(void (*)(void))step_slack, METH_FASTCALL,
     "replica._answer_step's slack and _record_recent's ring for a step's frames; frames late"},
    {"queue_remove", (PyCFunction)(void (*)(void))queue_remove, METH_FASTCALL,
     "scheduler.EdfScheduler._remove's column updates: frames out of the queue"},
    {"slots_distinct", (PyCFunction)(void (*)(void))slots_distinct, METH_FASTCALL,
     "replica.SlotPool.distinct's slot part: -1 when a slot repeats, else the unknown streams"},
    {"batch_values", (PyCFunction)(void (*)(void))batch_values, METH_FASTCALL,
     "contract.FrameBatch.validate's value checks of budgets, depths and refs; 0, or the first failed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_columns", "The codec replica's per-step column loops in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__columns(void) { return PyModule_Create(&module); }
