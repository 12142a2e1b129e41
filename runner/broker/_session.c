/* The embedded broker's read loop in C: runner/broker/session.py's PySession, step for step.
 *
 * Profiled under Celery, most of the broker's own time was the Python of its read loop and of
 * the fast path's commands (fast.py), run for every one of the ~21 commands a task costs. This is
 * the same loop, the same hot commands on the same fakeredis data, and the same end-of-batch
 * work (the batch's write(2) to the append-only log included), with the interpreter out of the
 * way. Everything else (fakeredis' commands, parking a blocked client, the log's fsync, failures
 * and compaction) is still the Python it was, called from here.
 *
 * The Python in session.py and fast.py is the reference: each function below names the one it
 * mirrors, and tests/test_broker_fast.py runs both against redis-server reply by reply.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define API 3                        /* session.API: the interface this file implements */
#define MAX_BULK (512LL * 1024 * 1024) /* Redis' proto-max-bulk-len */
#define MAX_INLINE (64 * 1024)
#define MAX_ARRAY (1024 * 1024)
#define MAX_NAME 24                  /* longer command names are never the fast path's */

/* ---------------------------------------------------------------------------------------------
 * names and constants
 */

static PyObject *s_authenticated, *s_pubsub, *s_db, *s_db_num, *s_dict, *s_watches, *s_values,
    *s_expirations, *s_expiry_heap, *s_expire_keys, *s_bylex, *s_add, *s_write, *s_close,
    *s_execute, *s_park, *s_attempt, *s_failed, *s_serve_parked, *s_close_killed,
    *s_append, *s_begin_group, *s_end_group, *s_value, *s_flush, *s_write_log;
static PyObject *s_error, *s_byscore, *s_remove_entry, *s_subscribers, *s_psubscribers, *s_data, *s_pending_removals, *s_commit_removals, *s_remove,
    *s_on_reply, *s_schedule_expiry;
static PyObject *b_lpop, *b_rpop, *b_set, *b_pxat, *b_message;
static PyObject *heappush; /* _heapq.heappush */
static PyObject *DEFER; /* a native handler's "not for the fast path": the caller runs it through fakeredis */

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* what time.time() reads */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------------
 * a growable byte buffer (a client's unread input, its unsent replies)
 */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
buf_put(Buf *b, const char *data, Py_ssize_t n)
{
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, data, n);
    b->len += n;
    return 0;
}

#define buf_lit(b, s) buf_put((b), (s), (Py_ssize_t)sizeof(s) - 1)

/* n in decimal, written backwards from `end`: where it starts (snprintf cost a tenth of the loop) */
static char *
decimal(char *end, long long n)
{
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        *--end = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (n < 0)
        *--end = '-';
    return end;
}

static int
buf_head(Buf *b, char kind, long long n) /* ":12\r\n", "*3\r\n", "$5\r\n" */
{
    char text[32], *end = text + sizeof text;
    *--end = '\n';
    *--end = '\r';
    char *start = decimal(end, n);
    *--start = kind;
    return buf_put(b, start, text + sizeof text - start);
}

static int
buf_bulk(Buf *b, const char *data, Py_ssize_t n)
{
    if (buf_reserve(b, n + 24) < 0 || buf_head(b, '$', n) < 0 || buf_put(b, data, n) < 0)
        return -1;
    return buf_lit(b, "\r\n");
}

static void
buf_free(Buf *b)
{
    PyMem_Free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* after a big reply or command, give the memory back rather than keep it for the connection's life */
static void
buf_trim(Buf *b)
{
    if (b->len == 0 && b->cap > (1 << 20))
        buf_free(b);
}

/* ---------------------------------------------------------------------------------------------
 * LogBuffer: aof.LogBuffer in C, the batch's writes encoded for the append-only log, and written
 * to its file at the end of the batch (Engine_after_batch, before the replies go out)
 */

typedef struct {
    PyObject_HEAD
    long long db;      /* the database the log's next command runs on; -1: it must state it */
    Buf parts;         /* writes not yet in the file, as the file holds them */
    Buf group;         /* a group's writes (a transaction's or a script's), kept together */
    int grouping;
    long group_writes;
    int fd;            /* the log file's descriptor (aof.AppendOnlyLog sets it); -1: none */
    long long written; /* bytes written to the file, ever: what the fsync thread has to cover */
} LogBuffer;

static PyTypeObject LogBufferType;

static int
put_command(Buf *b, PyObject *command) /* an array of bulk strings, as hiredis.pack_command writes it */
{
    PyObject *fast = PySequence_Fast(command, "a logged command must be a list or tuple of bytes");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int rc = buf_head(b, '*', n);
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        PyObject *part = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(part)) {
            PyErr_SetString(PyExc_TypeError, "a logged command's parts must be bytes");
            rc = -1;
        }
        else
            rc = buf_bulk(b, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part));
    }
    Py_DECREF(fast);
    return rc;
}

static int
log_append(LogBuffer *lb, long long db, PyObject *command)
{
    Buf *target = lb->grouping ? &lb->group : &lb->parts;
    if (db != lb->db) {
        char digits[24], *end = digits + sizeof digits, *start = decimal(end, db);
        if (buf_lit(target, "*2\r\n$6\r\nselect\r\n") < 0 || buf_bulk(target, start, end - start) < 0)
            return -1;
        lb->db = db;
    }
    if (put_command(target, command) < 0)
        return -1;
    lb->group_writes++;
    return 0;
}

static void
log_begin_group(LogBuffer *lb)
{
    lb->grouping = 1;
    lb->group.len = 0;
    lb->group_writes = 0;
}

static int
log_end_group(LogBuffer *lb)
{
    if (!lb->grouping)
        return 0;
    lb->grouping = 0;
    int rc = 0;
    if (lb->group_writes > 1)
        rc = buf_lit(&lb->parts, "*1\r\n$5\r\nmulti\r\n");
    if (rc == 0)
        rc = buf_put(&lb->parts, lb->group.data, lb->group.len);
    if (rc == 0 && lb->group_writes > 1)
        rc = buf_lit(&lb->parts, "*1\r\n$4\r\nexec\r\n");
    lb->group.len = 0;
    buf_trim(&lb->group);
    return rc;
}

/* everything in `parts` into the file: 0, or -1 with errno set and what was not written kept at
 * the front of `parts` (the file stays a prefix of the writes, in order). Holds the GIL: a write to
 * the kernel's page cache takes microseconds, and nothing else may touch the buffer meanwhile. */
static int
log_write(LogBuffer *lb)
{
    Py_ssize_t done = 0;
    int error = 0;
    while (done < lb->parts.len) {
        ssize_t n = write(lb->fd, lb->parts.data + done, (size_t)(lb->parts.len - done));
        if (n > 0) {
            done += n;
            lb->written += n;
        }
        else if (n < 0 && errno == EINTR)
            continue;
        else {
            error = n < 0 ? errno : EIO; /* (0 bytes written of a regular file: never retried forever) */
            break;
        }
    }
    if (error == 0) {
        lb->parts.len = 0;
        buf_trim(&lb->parts);
        return 0;
    }
    memmove(lb->parts.data, lb->parts.data + done, (size_t)(lb->parts.len - done));
    lb->parts.len -= done;
    errno = error;
    return -1;
}

static PyObject *
LogBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    LogBuffer *lb = (LogBuffer *)type->tp_alloc(type, 0);
    if (lb != NULL) {
        lb->db = -1;
        lb->fd = -1;
    }
    return (PyObject *)lb;
}

static void
LogBuffer_dealloc(LogBuffer *lb)
{
    buf_free(&lb->parts);
    buf_free(&lb->group);
    Py_TYPE(lb)->tp_free((PyObject *)lb);
}

static PyObject *
LogBuffer_append(LogBuffer *lb, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "append(db, command)");
        return NULL;
    }
    long long db = PyLong_AsLongLong(args[0]);
    if (db == -1 && PyErr_Occurred())
        return NULL;
    if (log_append(lb, db, args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
LogBuffer_begin_group(LogBuffer *lb, PyObject *unused)
{
    log_begin_group(lb);
    Py_RETURN_NONE;
}

static PyObject *
LogBuffer_end_group(LogBuffer *lb, PyObject *unused)
{
    if (log_end_group(lb) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
LogBuffer_write(LogBuffer *lb, PyObject *unused)
{
    if (lb->parts.len && log_write(lb) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
LogBuffer_clear(LogBuffer *lb, PyObject *unused)
{
    lb->parts.len = 0;
    buf_trim(&lb->parts);
    Py_RETURN_NONE;
}

static PyObject *
LogBuffer_get_db(LogBuffer *lb, void *unused)
{
    if (lb->db < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(lb->db);
}

static int
LogBuffer_set_db(LogBuffer *lb, PyObject *value, void *unused)
{
    if (value == NULL || value == Py_None) {
        lb->db = -1;
        return 0;
    }
    long long db = PyLong_AsLongLong(value);
    if (db == -1 && PyErr_Occurred())
        return -1;
    if (db < 0) {
        PyErr_SetString(PyExc_ValueError, "a database number is not negative");
        return -1;
    }
    lb->db = db;
    return 0;
}

static PyMethodDef LogBuffer_methods[] = {
    {"append", (PyCFunction)(void (*)(void))LogBuffer_append, METH_FASTCALL, NULL},
    {"begin_group", (PyCFunction)LogBuffer_begin_group, METH_NOARGS, NULL},
    {"end_group", (PyCFunction)LogBuffer_end_group, METH_NOARGS, NULL},
    {"write", (PyCFunction)LogBuffer_write, METH_NOARGS, NULL},
    {"clear", (PyCFunction)LogBuffer_clear, METH_NOARGS, NULL},
    {NULL},
};

static PyObject *
LogBuffer_get_pending(LogBuffer *lb, void *unused)
{
    return PyLong_FromSsize_t(lb->parts.len);
}

static PyGetSetDef LogBuffer_getset[] = {
    {"db", (getter)LogBuffer_get_db, (setter)LogBuffer_set_db, NULL, NULL},
    {"pending", (getter)LogBuffer_get_pending, NULL, NULL, NULL},
    {NULL},
};

static PyMemberDef LogBuffer_members[] = {
    {"fd", T_INT, offsetof(LogBuffer, fd), 0, NULL},
    {"written", T_LONGLONG, offsetof(LogBuffer, written), READONLY, NULL},
    {NULL},
};

static PyTypeObject LogBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runner.broker._session.LogBuffer",
    .tp_basicsize = sizeof(LogBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "aof.LogBuffer in C: the batch's writes encoded for the append-only log, and written to it.",
    .tp_new = LogBuffer_new,
    .tp_dealloc = (destructor)LogBuffer_dealloc,
    .tp_methods = LogBuffer_methods,
    .tp_members = LogBuffer_members,
    .tp_getset = LogBuffer_getset,
};

/* ---------------------------------------------------------------------------------------------
 * Engine: the server as the compiled sessions see it (session.engine_for builds it)
 */

typedef struct Engine Engine;
typedef struct Session Session;
typedef PyObject *(*native_fn)(Engine *, Session *, PyObject *sock, PyObject *command);

struct Session {
    PyObject_HEAD
    PyObject *server, *engine, *sock, *transport, *parked, *fast_multi;
    char closing, fast_ready;
    int protocol;
    Buf in;               /* bytes received, not yet parsed from in_start on */
    Py_ssize_t in_start;
    Buf out;              /* replies not yet sent */
    /* What the loop reads of the client's fakeredis socket for each command, kept between them:
     * only a command fakeredis runs for this client changes it (AUTH, HELLO, SELECT, RESET,
     * PSUBSCRIBE...), and it is read again after each of those (forget_sock). */
    PyObject *known_sock;     /* the socket it is of (borrowed: compared, never used); NULL: unknown */
    PyObject *known_db, *known_db_num;
    char known_authenticated;
    long known_pubsub;
    PyObject *write, *write_of; /* transport.write, bound, and the transport it is of (borrowed) */
};

enum { K_FAST = 1, K_POP, K_MULTI, K_EXEC, K_DISCARD };

typedef struct {
    char name[MAX_NAME];
    Py_ssize_t len;
    int kind;
    int pubsub_ok;      /* allowed to a subscribed RESP2 client (fast.PUBSUB_ALLOWED) */
    native_fn native;   /* run here, or */
    PyObject *python;   /* the fast path's Python handler (fast.FastPath), borrowed from `handlers` */
} Command;

#define MAX_COMMANDS 48
#define BUCKETS 32 /* by the name's first letter (lower case) & 31 */
#define PER_BUCKET 8

struct Engine {
    PyObject_HEAD
    PyObject *server, *core, *aof, *dirty, *parked, *touched, *waiting, *handlers;
    PyObject *item_type, *hash_type, *zset_type, *push_type, *simple_string, *simple_error;
    PyObject *defer, *ok, *queued, *no_reply, *pong, *wrongtype, *not_a_float, *multi_nested;
    PyObject *encode, *redis_double, *zadd_options, *watched_changed, *pubsub_allowed;
    PyObject *hold; /* FastPath.hold: a task message popped, held in kombu's unacked hash (delivery_hold.py) */
    LogBuffer *log; /* the append-only log's buffer when it is the compiled one (else: aof.append) */
    PyObject *weakset_type;
    PyObject *spare_hashes, *spare_zsets, *spare_channels; /* see take_spare */
    Py_ssize_t value_offset, expireat_offset; /* fakeredis' Item.__slots__ */
    char halted;
    char check_kills; /* a CLIENT command ran: a CLIENT KILL may have closed someone */
    long long commands_processed;
    Command commands[MAX_COMMANDS];
    int ncommands;
    Command *buckets[BUCKETS][PER_BUCKET]; /* the commands again, by first letter: find_command's index */
    int bucket_sizes[BUCKETS];
};

static PyTypeObject EngineType;
static PyTypeObject SessionType;

#define SLOT(object, offset) (*(PyObject **)((char *)(object) + (offset)))

/* ---------------------------------------------------------------------------------------------
 * replies: resp.encode, by exact type, commonest first; anything unusual goes to the Python one
 */

static int
encode_into(Engine *e, Buf *b, PyObject *value, int protocol)
{
    if (PyBytes_CheckExact(value))
        return buf_bulk(b, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (!overflow)
            return buf_head(b, ':', n);
    }
    else if (PyList_CheckExact(value) || Py_IS_TYPE(value, (PyTypeObject *)e->push_type)) {
        char kind = (protocol == 3 && !PyList_CheckExact(value)) ? '>' : '*';
        Py_ssize_t n = PyList_GET_SIZE(value);
        if (buf_head(b, kind, n) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
            PyObject *item = PyList_GET_ITEM(value, i);
            Py_INCREF(item);
            int rc = encode_into(e, b, item, protocol);
            Py_DECREF(item);
            if (rc < 0)
                return -1;
        }
        return 0;
    }
    else if (value == Py_None)
        return protocol == 3 ? buf_lit(b, "_\r\n") : buf_lit(b, "$-1\r\n");
    else if (value == e->ok)
        return buf_lit(b, "+OK\r\n");
    else if (value == e->queued)
        return buf_lit(b, "+QUEUED\r\n");
    else if (Py_IS_TYPE(value, (PyTypeObject *)e->simple_string)) {
        PyObject *text = PyObject_GetAttr(value, s_value);
        if (text == NULL)
            return -1;
        int rc = -1;
        if (PyBytes_Check(text) && buf_lit(b, "+") == 0
            && buf_put(b, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text)) == 0)
            rc = buf_lit(b, "\r\n");
        else if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "SimpleString value must be bytes");
        Py_DECREF(text);
        return rc;
    }
    PyObject *proto = PyLong_FromLong(protocol);
    if (proto == NULL)
        return -1;
    PyObject *encoded = PyObject_CallFunctionObjArgs(e->encode, value, proto, NULL);
    Py_DECREF(proto);
    if (encoded == NULL)
        return -1;
    int rc = -1;
    if (PyBytes_Check(encoded))
        rc = buf_put(b, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    else
        PyErr_SetString(PyExc_TypeError, "encode() must return bytes");
    Py_DECREF(encoded);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * the data: fast.FastPath's helpers
 */

/* FastPath._item: the key's Item (borrowed), NULL if there is none or it expired (then dropped) */
static int
lookup(Engine *e, PyObject *dict, PyObject *key, PyObject **item)
{
    *item = NULL;
    PyObject *found = PyDict_GetItemWithError(dict, key);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *expireat = SLOT(found, e->expireat_offset);
    if (expireat != NULL && expireat != Py_None) {
        double when = PyFloat_AsDouble(expireat);
        if (when == -1.0 && PyErr_Occurred())
            return -1;
        if (when < now_seconds())
            return PyDict_DelItem(dict, key);
    }
    *item = found;
    return 0;
}

static PyObject *
new_item(Engine *e, PyObject *value) /* Item(value): through the slots, as Item.__init__ sets them */
{
    PyTypeObject *type = (PyTypeObject *)e->item_type;
    PyObject *item = type->tp_alloc(type, 0);
    if (item == NULL)
        return NULL;
    Py_INCREF(value);
    SLOT(item, e->value_offset) = value;
    Py_INCREF(Py_None);
    SLOT(item, e->expireat_offset) = Py_None;
    return item;
}

static void
forget_sock(Session *s)
{
    s->known_sock = NULL;
    Py_CLEAR(s->known_db);
    Py_CLEAR(s->known_db_num);
}

static int
know_sock(Session *s)
{
    if (s->known_sock != NULL && s->known_sock == s->sock)
        return 0;
    forget_sock(s);
    if (s->sock == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a session without its socket");
        return -1;
    }
    PyObject *value = PyObject_GetAttr(s->sock, s_authenticated);
    int authenticated = value == NULL ? -1 : PyObject_IsTrue(value);
    Py_XDECREF(value);
    value = authenticated < 0 ? NULL : PyObject_GetAttr(s->sock, s_pubsub);
    long pubsub = value == NULL ? -1 : PyLong_AsLong(value);
    Py_XDECREF(value);
    if (pubsub == -1 && (PyErr_Occurred() || authenticated < 0))
        return -1;
    PyObject *db = PyObject_GetAttr(s->sock, s_db);
    PyObject *db_num = db == NULL ? NULL : PyObject_GetAttr(s->sock, s_db_num);
    if (db_num == NULL || !PyLong_Check(db_num)) {
        if (db_num != NULL)
            PyErr_SetString(PyExc_TypeError, "the socket's _db_num is not an int");
        Py_XDECREF(db);
        Py_XDECREF(db_num);
        return -1;
    }
    s->known_db = db;
    s->known_db_num = db_num;
    s->known_authenticated = (char)authenticated;
    s->known_pubsub = pubsub;
    s->known_sock = s->sock;
    return 0;
}

/* the client's database and its dict (new references) */
static int
database(Session *s, PyObject **db, PyObject **dict)
{
    *db = *dict = NULL;
    if (know_sock(s) < 0)
        return -1;
    *dict = PyObject_GetAttr(s->known_db, s_dict);
    if (*dict == NULL || !PyDict_Check(*dict)) {
        if (*dict != NULL)
            PyErr_SetString(PyExc_TypeError, "the database's _dict is not a dict");
        Py_CLEAR(*dict);
        return -1;
    }
    *db = s->known_db;
    Py_INCREF(*db);
    return 0;
}

/* FastPath._wrote + EmbeddedBroker.wrote: watchers told, parked clients woken, the write logged */
static int
wrote(Engine *e, Session *s, PyObject *db, PyObject *command, PyObject *key)
{
    PyObject *sock = s->sock;
    PyObject *watches = PyObject_GetAttr(db, s_watches);
    if (watches == NULL)
        return -1;
    Py_ssize_t watched = PyObject_Length(watches);
    Py_DECREF(watches);
    if (watched < 0)
        return -1;
    if (watched) {
        PyObject *r = PyObject_CallFunctionObjArgs(e->watched_changed, sock, key, NULL);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    if (PyDict_GET_SIZE(e->waiting) == 0 && e->aof == Py_None)
        return 0;
    if (know_sock(s) < 0)
        return -1;
    PyObject *number = s->known_db_num;
    Py_INCREF(number);
    int rc = 0;
    if (PyDict_GET_SIZE(e->waiting)) {
        PyObject *waited = PyTuple_Pack(2, number, key);
        rc = waited == NULL ? -1 : PyDict_Contains(e->waiting, waited);
        if (rc > 0)
            rc = PySet_Add(e->touched, waited);
        Py_XDECREF(waited);
    }
    if (rc == 0 && e->log != NULL) {
        long long db_number = PyLong_AsLongLong(number);
        rc = (db_number == -1 && PyErr_Occurred()) ? -1 : log_append(e->log, db_number, command);
    }
    else if (rc == 0 && e->aof != Py_None) {
        PyObject *r = PyObject_CallMethodObjArgs(e->aof, s_append, number, command, NULL);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    Py_DECREF(number);
    return rc < 0 ? -1 : 0;
}

static PyObject *
defer(void)
{
    Py_INCREF(DEFER);
    return DEFER;
}

static PyObject *
new_ref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}

/* fast._positive_int: digits, no leading zero, at most 15 of them; else -1 (defer) */
static long long
positive_int(PyObject *raw)
{
    const char *s = PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    if (n == 0 || n > 15 || s[0] == '0')
        return -1;
    long long value = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        value = value * 10 + (s[i] - '0');
    }
    return value;
}

static int
equals_lower(PyObject *raw, const char *word) /* raw.lower() == word */
{
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    if ((size_t)n != strlen(word))
        return 0;
    const char *s = PyBytes_AS_STRING(raw);
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != word[i])
            return 0;
    }
    return 1;
}

/* Spares. Creating fakeredis' Hash, ZSet (and its SortedList) and a channel's WeakSet runs their
 * Python __init__, and Celery makes and empties one of each per task (the unacked hash and its
 * index, the result's channel): a container emptied by a command is kept, up to MAX_SPARES of a
 * kind, to be the next new key's (or channel's) instead, when it is as a new one would be. */
#define MAX_SPARES 16

static PyObject *
take_spare(PyObject *spares, PyObject *type) /* a spare, or a new one (new reference) */
{
    Py_ssize_t n = PyList_GET_SIZE(spares);
    if (n == 0)
        return PyObject_CallNoArgs(type);
    PyObject *spare = PyList_GET_ITEM(spares, n - 1);
    Py_INCREF(spare);
    if (PyList_SetSlice(spares, n - 1, n, NULL) < 0) {
        Py_DECREF(spare);
        return NULL;
    }
    return spare;
}

/* keep `value` if it is exactly `type` and each of its named containers is empty (anything
 * unexpected: not kept, never an error) */
static void
keep_spare(PyObject *spares, PyObject *value, PyObject *type, PyObject *const *empty)
{
    if (PyList_GET_SIZE(spares) >= MAX_SPARES || (PyObject *)Py_TYPE(value) != type)
        return;
    for (int i = 0; empty[i]; i++) {
        PyObject *part = PyObject_GetAttr(value, empty[i]);
        Py_ssize_t size = part == NULL ? -1 : PyObject_Length(part);
        Py_XDECREF(part);
        if (size != 0) {
            PyErr_Clear();
            return;
        }
    }
    if (PyList_Append(spares, value) < 0)
        PyErr_Clear();
}

/* the containers that must be empty, by name (interned at import) */
static const char *const EMPTY_HASH_NAMES[] = {"_values", "_expirations", "_expiry_heap", "_expired_fields", NULL};
static const char *const EMPTY_ZSET_NAMES[] = {"_bylex", "_byscore", NULL};
static const char *const EMPTY_CHANNEL_NAMES[] = {"data", "_pending_removals", "_iterating", NULL};
static PyObject *EMPTY_HASH[5], *EMPTY_ZSET[3], *EMPTY_CHANNEL[4];

static int
intern_all(const char *const *names, PyObject **into)
{
    int i = 0;
    for (; names[i]; i++)
        if ((into[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return -1;
    into[i] = NULL;
    return 0;
}

#define ARG(command, i) PyList_GET_ITEM((command), (i))
#define NARGS(command) PyList_GET_SIZE(command)

/* ---------------------------------------------------------------------------------------------
 * the fast path's commands (fast.FastPath, method by method)
 */

static PyObject *
c_get(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) != 2)
        return defer();
    PyObject *db, *dict, *item, *result = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    if (lookup(e, dict, ARG(command, 1), &item) == 0) {
        if (item == NULL)
            result = new_ref(Py_None);
        else {
            PyObject *value = SLOT(item, e->value_offset);
            result = new_ref(value != NULL && PyBytes_CheckExact(value) ? value : e->wrongtype);
        }
    }
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

/* Database.schedule_expiry: (expireat, key) on the database's heap, for the sweep to find */
static int
schedule_expiry(PyObject *db, PyObject *dict, PyObject *key, PyObject *at)
{
    PyObject *heap = PyObject_GetAttr(db, s_expiry_heap);
    if (heap == NULL)
        return -1;
    PyObject *r;
    if (!PyList_Check(heap) || PyList_GET_SIZE(heap) > 2 * PyDict_GET_SIZE(dict) + 64)
        r = PyObject_CallMethodObjArgs(db, s_schedule_expiry, key, at, NULL); /* (its rebuild of stale entries) */
    else {
        PyObject *entry = PyTuple_Pack(2, at, key);
        r = entry == NULL ? NULL : PyObject_CallFunctionObjArgs(heappush, heap, entry, NULL);
        Py_XDECREF(entry);
    }
    Py_DECREF(heap);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* FastPath._store */
static PyObject *
store(Engine *e, Session *s, PyObject *sock, PyObject *command, PyObject *key, PyObject *value, int expires, double seconds)
{
    PyObject *db, *dict, *item = NULL, *result = NULL, *logged = NULL, *when = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    item = new_item(e, value);
    if (item == NULL)
        goto done;
    if (!expires) {
        if (PyDict_SetItem(dict, key, item) < 0 || wrote(e, s, db, command, key) < 0)
            goto done;
    }
    else {
        double expireat = now_seconds() + seconds;
        PyObject *at = PyFloat_FromDouble(expireat);
        if (at == NULL)
            goto done;
        Py_SETREF(SLOT(item, e->expireat_offset), at);
        if (PyDict_SetItem(dict, key, item) < 0 || schedule_expiry(db, dict, key, at) < 0)
            goto done;
        /* logged with its absolute expiry, as Redis' AOF writes it: a replay keeps the time it had */
        char digits[24], *end = digits + sizeof digits;
        char *start = decimal(end, (long long)(expireat * 1000));
        when = PyBytes_FromStringAndSize(start, end - start);
        if (when == NULL)
            goto done;
        logged = PyList_New(5);
        if (logged == NULL)
            goto done;
        PyObject *parts[5] = {b_set, key, value, b_pxat, when};
        for (int i = 0; i < 5; i++) {
            Py_INCREF(parts[i]);
            PyList_SET_ITEM(logged, i, parts[i]);
        }
        if (wrote(e, s, db, logged, key) < 0)
            goto done;
    }
    result = new_ref(e->ok);
done:
    Py_XDECREF(item);
    Py_XDECREF(logged);
    Py_XDECREF(when);
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

static PyObject *
c_set(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) == 3)
        return store(e, s, sock, command, ARG(command, 1), ARG(command, 2), 0, 0);
    if (NARGS(command) == 5) {
        int ex = equals_lower(ARG(command, 3), "ex"), px = equals_lower(ARG(command, 3), "px");
        if (ex || px) {
            long long amount = positive_int(ARG(command, 4));
            if (amount < 0)
                return defer();
            return store(e, s, sock, command, ARG(command, 1), ARG(command, 2), 1,
                         ex ? (double)amount : (double)amount / 1000);
        }
    }
    return defer();
}

static PyObject *
c_setex(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) != 4)
        return defer();
    long long amount = positive_int(ARG(command, 2));
    if (amount < 0)
        return defer();
    return store(e, s, sock, command, ARG(command, 1), ARG(command, 3), 1, (double)amount);
}

/* FastPath._push */
static PyObject *
push(Engine *e, Session *s, PyObject *sock, PyObject *command, int left)
{
    Py_ssize_t n = NARGS(command);
    if (n < 3)
        return defer();
    PyObject *db, *dict, *item, *key = ARG(command, 1), *result = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    if (lookup(e, dict, key, &item) < 0)
        goto done;
    if (item == NULL) {
        PyObject *list = PyList_New(0);
        if (list == NULL)
            goto done;
        item = new_item(e, list);
        Py_DECREF(list);
        if (item == NULL)
            goto done;
        int rc = PyDict_SetItem(dict, key, item);
        Py_DECREF(item); /* the dict holds it */
        if (rc < 0)
            goto done;
    }
    PyObject *list = SLOT(item, e->value_offset);
    if (list == NULL || !PyList_CheckExact(list)) {
        result = new_ref(e->wrongtype);
        goto done;
    }
    Py_INCREF(list);
    int rc = 0;
    if (left) {
        PyObject *values = PyList_New(n - 2); /* values[::-1] at the front */
        if (values == NULL)
            rc = -1;
        else {
            for (Py_ssize_t i = 2; i < n; i++) {
                PyObject *value = ARG(command, i);
                Py_INCREF(value);
                PyList_SET_ITEM(values, n - 1 - i, value);
            }
            rc = PyList_SetSlice(list, 0, 0, values);
            Py_DECREF(values);
        }
    }
    else {
        for (Py_ssize_t i = 2; i < n && rc == 0; i++)
            rc = PyList_Append(list, ARG(command, i));
    }
    if (rc == 0 && wrote(e, s, db, command, key) == 0)
        result = PyLong_FromSsize_t(PyList_GET_SIZE(list));
    Py_DECREF(list);
done:
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

static PyObject *c_lpush(Engine *e, Session *s, PyObject *sock, PyObject *command) { return push(e, s, sock, command, 1); }
static PyObject *c_rpush(Engine *e, Session *s, PyObject *sock, PyObject *command) { return push(e, s, sock, command, 0); }

/* FastPath._pop: 1 and *value (new) popped, 0 no list, 2 not a list, -1 error */
static int
pop(Engine *e, PyObject *dict, PyObject *key, int left, PyObject **value)
{
    PyObject *item;
    *value = NULL;
    if (lookup(e, dict, key, &item) < 0)
        return -1;
    if (item == NULL)
        return 0;
    PyObject *list = SLOT(item, e->value_offset);
    if (list == NULL || !PyList_CheckExact(list))
        return 2;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from empty list");
        return -1;
    }
    Py_ssize_t at = left ? 0 : n - 1;
    *value = PyList_GET_ITEM(list, at);
    Py_INCREF(*value);
    if (PyList_SetSlice(list, at, at + 1, NULL) < 0) {
        Py_CLEAR(*value);
        return -1;
    }
    if (PyList_GET_SIZE(list) == 0 && PyDict_DelItem(dict, key) < 0) {
        Py_CLEAR(*value);
        return -1;
    }
    return 1;
}

/* FastPath._blocking_pop: [key, value], None (the server parks the client), WRONGTYPE */
static PyObject *
blocking_pop(Engine *e, Session *s, PyObject *sock, PyObject *command, int left)
{
    Py_ssize_t n = NARGS(command);
    if (n < 3)
        return defer();
    PyObject *timeout = PyFloat_FromString(ARG(command, n - 1));
    if (timeout == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear();
        return defer();
    }
    double seconds = PyFloat_AS_DOUBLE(timeout);
    Py_DECREF(timeout);
    if (!(seconds >= 0) || isinf(seconds))
        return defer();
    PyObject *db, *dict, *result = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    for (Py_ssize_t i = 1; i < n - 1; i++) {
        PyObject *key = ARG(command, i), *value;
        int got = pop(e, dict, key, left, &value);
        if (got < 0)
            goto done;
        if (got == 2) {
            result = new_ref(e->wrongtype);
            goto done;
        }
        if (got == 1) {
            /* logged as what it did (its timeout does not matter to a replay) */
            PyObject *logged = PyList_New(2);
            if (logged == NULL) {
                Py_DECREF(value);
                goto done;
            }
            Py_INCREF(left ? b_lpop : b_rpop);
            PyList_SET_ITEM(logged, 0, left ? b_lpop : b_rpop);
            Py_INCREF(key);
            PyList_SET_ITEM(logged, 1, key);
            int rc = wrote(e, s, db, logged, key);
            Py_DECREF(logged);
            if (rc == 0) {
                PyObject *held = PyObject_CallFunctionObjArgs(e->hold, sock, value, NULL);
                rc = held == NULL ? -1 : 0;
                Py_XDECREF(held);
            }
            if (rc < 0) {
                Py_DECREF(value);
                goto done;
            }
            result = PyList_New(2);
            if (result == NULL) {
                Py_DECREF(value);
                goto done;
            }
            Py_INCREF(key);
            PyList_SET_ITEM(result, 0, key);
            PyList_SET_ITEM(result, 1, value);
            goto done;
        }
    }
    result = new_ref(Py_None);
done:
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

static PyObject *c_brpop(Engine *e, Session *s, PyObject *sock, PyObject *command) { return blocking_pop(e, s, sock, command, 0); }
static PyObject *c_blpop(Engine *e, Session *s, PyObject *sock, PyObject *command) { return blocking_pop(e, s, sock, command, 1); }

/* FastPath._hash: 1 and *item (new) with due field TTLs applied, 0 none, 2 WRONGTYPE, -1 error */
static int
hash_item(Engine *e, PyObject *dict, PyObject *key, int create, PyObject **item)
{
    PyObject *found;
    *item = NULL;
    for (;;) {
        if (lookup(e, dict, key, &found) < 0)
            return -1;
        if (found == NULL) {
            if (!create)
                return 0;
            PyObject *hash = take_spare(e->spare_hashes, e->hash_type);
            if (hash == NULL)
                return -1;
            found = new_item(e, hash);
            Py_DECREF(hash);
            if (found == NULL)
                return -1;
            if (PyDict_SetItem(dict, key, found) < 0) {
                Py_DECREF(found);
                return -1;
            }
            *item = found;
            return 1;
        }
        PyObject *hash = SLOT(found, e->value_offset);
        if (hash == NULL || (PyObject *)Py_TYPE(hash) != e->hash_type)
            return 2;
        Py_INCREF(found);
        PyObject *heap = PyObject_GetAttr(hash, s_expiry_heap);
        if (heap == NULL) {
            Py_DECREF(found);
            return -1;
        }
        int due = PyObject_IsTrue(heap);
        Py_DECREF(heap);
        if (due < 0) {
            Py_DECREF(found);
            return -1;
        }
        if (!due) {
            *item = found;
            return 1;
        }
        PyObject *r = PyObject_CallMethodNoArgs(hash, s_expire_keys);
        if (r == NULL) {
            Py_DECREF(found);
            return -1;
        }
        Py_DECREF(r);
        PyObject *values = PyObject_GetAttr(hash, s_values);
        if (values == NULL) {
            Py_DECREF(found);
            return -1;
        }
        Py_ssize_t left = PyObject_Length(values);
        Py_DECREF(values);
        if (left < 0) {
            Py_DECREF(found);
            return -1;
        }
        if (left) {
            *item = found;
            return 1;
        }
        Py_DECREF(found);
        if (PyDict_DelItem(dict, key) < 0) /* every field expired: Redis has no such key */
            return -1;
    }
}

/* a Hash's two dicts (new references) */
static int
hash_dicts(Engine *e, PyObject *item, PyObject **fields, PyObject **expirations)
{
    PyObject *hash = SLOT(item, e->value_offset);
    *expirations = NULL;
    *fields = PyObject_GetAttr(hash, s_values);
    if (*fields == NULL)
        return -1;
    *expirations = PyObject_GetAttr(hash, s_expirations);
    if (*expirations == NULL || !PyDict_Check(*fields) || !PyDict_Check(*expirations)) {
        if (*expirations != NULL)
            PyErr_SetString(PyExc_TypeError, "a Hash's fields are not dicts");
        Py_CLEAR(*fields);
        Py_CLEAR(*expirations);
        return -1;
    }
    return 0;
}

static int
drop(PyObject *dict, PyObject *key) /* dict.pop(key, None): 1 if it was there */
{
    int there = PyDict_Contains(dict, key);
    if (there > 0 && PyDict_DelItem(dict, key) < 0)
        return -1;
    return there;
}

static PyObject *
c_hset(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    Py_ssize_t n = NARGS(command);
    if (n < 4 || n % 2)
        return defer();
    PyObject *db, *dict, *item, *fields = NULL, *expirations = NULL, *result = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    int got = hash_item(e, dict, ARG(command, 1), 1, &item);
    if (got < 0)
        goto done;
    if (got == 2) {
        result = new_ref(e->wrongtype);
        goto done;
    }
    if (hash_dicts(e, item, &fields, &expirations) == 0) {
        /* Hash's own dicts: its methods convert and check every field again (fields here are bytes) */
        Py_ssize_t before = PyDict_GET_SIZE(fields);
        int rc = 0;
        for (Py_ssize_t at = 2; at < n && rc == 0; at += 2) {
            if (PyDict_GET_SIZE(expirations) && drop(expirations, ARG(command, at)) < 0)
                rc = -1; /* HSET clears a field's TTL, as in Redis */
            else
                rc = PyDict_SetItem(fields, ARG(command, at), ARG(command, at + 1));
        }
        if (rc == 0 && wrote(e, s, db, command, ARG(command, 1)) == 0)
            result = PyLong_FromSsize_t(PyDict_GET_SIZE(fields) - before);
    }
    Py_DECREF(item);
done:
    Py_XDECREF(fields);
    Py_XDECREF(expirations);
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

static PyObject *
c_hdel(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    Py_ssize_t n = NARGS(command);
    if (n < 3)
        return defer();
    PyObject *db, *dict, *item, *fields = NULL, *expirations = NULL, *result = NULL;
    if (database(s, &db, &dict) < 0)
        return NULL;
    int got = hash_item(e, dict, ARG(command, 1), 0, &item);
    if (got < 0)
        goto done;
    if (got != 1) {
        result = got == 0 ? PyLong_FromLong(0) : new_ref(e->wrongtype);
        goto done;
    }
    if (hash_dicts(e, item, &fields, &expirations) == 0) {
        long removed = 0;
        int rc = 0;
        for (Py_ssize_t at = 2; at < n && rc == 0; at++) {
            int there = drop(fields, ARG(command, at));
            if (there < 0)
                rc = -1;
            else if (there) {
                rc = drop(expirations, ARG(command, at)) < 0 ? -1 : 0;
                removed++;
            }
        }
        if (rc == 0 && PyDict_GET_SIZE(fields) == 0) {
            keep_spare(e->spare_hashes, SLOT(item, e->value_offset), e->hash_type, EMPTY_HASH);
            rc = PyDict_DelItem(dict, ARG(command, 1));
        }
        if (rc == 0 && removed)
            rc = wrote(e, s, db, command, ARG(command, 1));
        if (rc == 0)
            result = PyLong_FromLong(removed);
    }
    Py_DECREF(item);
done:
    Py_XDECREF(fields);
    Py_XDECREF(expirations);
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

/* fast.PLAIN_SCORE: [-+]?(digits{1,300}(.digits{0,300})?|.digits{1,300}), the whole text: a
 * score Python's float() and Redis' strtod read alike */
static int
plain_score(PyObject *raw)
{
    const char *s = PyBytes_AS_STRING(raw), *end = s + PyBytes_GET_SIZE(raw);
    if (s < end && (*s == '-' || *s == '+'))
        s++;
    const char *start = s;
    while (s < end && *s >= '0' && *s <= '9')
        s++;
    Py_ssize_t whole = s - start;
    if (whole > 300)
        return 0;
    if (s == end)
        return whole > 0;
    if (*s != '.')
        return 0;
    const char *fraction = ++s;
    while (s < end && *s >= '0' && *s <= '9')
        s++;
    Py_ssize_t decimals = s - fraction;
    return s == end && decimals <= 300 && (whole > 0 || decimals > 0);
}

/* SortedList.add / .remove of a (score, member) entry */
static PyObject *
zset_entry_call(PyObject *byscore, PyObject *method, PyObject *score, PyObject *member)
{
    PyObject *entry = PyTuple_Pack(2, score, member);
    if (entry == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodOneArg(byscore, method, entry);
    Py_DECREF(entry);
    return r;
}

static PyObject *
c_zadd(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    Py_ssize_t n = NARGS(command);
    if (n < 4 || n % 2)
        return defer();
    Py_ssize_t pairs = (n - 2) / 2;
    double *scores = PyMem_Malloc(sizeof(double) * pairs);
    if (scores == NULL)
        return PyErr_NoMemory();
    PyObject *db = NULL, *dict = NULL, *bylex = NULL, *result = NULL;
    for (Py_ssize_t p = 0; p < pairs; p++) {
        PyObject *raw = ARG(command, 2 + 2 * p);
        if (plain_score(raw)) {
            scores[p] = PyOS_string_to_double(PyBytes_AS_STRING(raw), NULL, NULL);
            if (scores[p] == -1.0 && PyErr_Occurred())
                goto done;
            continue;
        }
        PyObject *upper = PyObject_CallMethod(raw, "upper", NULL);
        if (upper == NULL)
            goto done;
        int option = PySequence_Contains(e->zadd_options, upper);
        Py_DECREF(upper);
        if (option < 0)
            goto done;
        if (option) {
            result = defer(); /* fakeredis has the options */
            goto done;
        }
        PyObject *score = PyObject_CallFunctionObjArgs(e->redis_double, raw, NULL);
        if (score == NULL)
            goto done;
        if (score == Py_None) { /* Redis reads every score before it looks at the key */
            Py_DECREF(score);
            result = new_ref(e->not_a_float);
            goto done;
        }
        scores[p] = PyFloat_AsDouble(score);
        Py_DECREF(score);
        if (scores[p] == -1.0 && PyErr_Occurred())
            goto done;
    }
    if (database(s, &db, &dict) < 0)
        goto done;
    PyObject *key = ARG(command, 1), *item;
    if (lookup(e, dict, key, &item) < 0)
        goto done;
    if (item == NULL) {
        PyObject *zset = take_spare(e->spare_zsets, e->zset_type);
        if (zset == NULL)
            goto done;
        item = new_item(e, zset);
        Py_DECREF(zset);
        if (item == NULL)
            goto done;
        int rc = PyDict_SetItem(dict, key, item);
        Py_DECREF(item);
        if (rc < 0)
            goto done;
    }
    PyObject *zset = SLOT(item, e->value_offset);
    if (zset == NULL || !PyObject_TypeCheck(zset, (PyTypeObject *)e->zset_type)) {
        result = new_ref(e->wrongtype);
        goto done;
    }
    Py_INCREF(zset);
    bylex = PyObject_GetAttr(zset, s_bylex);
    PyObject *byscore = bylex == NULL ? NULL : PyObject_GetAttr(zset, s_byscore);
    long added = 0;
    int rc = byscore == NULL || !PyDict_Check(bylex) ? -1 : 0;
    if (rc < 0 && byscore != NULL)
        PyErr_SetString(PyExc_TypeError, "a ZSet's _bylex is not a dict");
    for (Py_ssize_t p = 0; p < pairs && rc == 0; p++) { /* ZSet.add, on its two structures */
        PyObject *member = ARG(command, 3 + 2 * p);
        PyObject *old = PyDict_GetItemWithError(bylex, member);
        if (old == NULL && PyErr_Occurred()) {
            rc = -1;
            break;
        }
        added += old == NULL;
        PyObject *score = PyFloat_FromDouble(scores[p] + 0.0);
        if (score == NULL) {
            rc = -1;
            break;
        }
        if (old != NULL) {
            Py_INCREF(old);
            int same = PyObject_RichCompareBool(score, old, Py_EQ);
            PyObject *r = same ? NULL : zset_entry_call(byscore, s_remove_entry, old, member);
            Py_DECREF(old);
            if (same < 0 || (!same && r == NULL))
                rc = -1;
            Py_XDECREF(r);
            if (same) {
                Py_DECREF(score);
                continue;
            }
        }
        if (rc == 0 && PyDict_SetItem(bylex, member, score) < 0)
            rc = -1;
        if (rc == 0) {
            PyObject *r = zset_entry_call(byscore, s_add, score, member);
            rc = r == NULL ? -1 : 0;
            Py_XDECREF(r);
        }
        Py_DECREF(score);
    }
    Py_XDECREF(byscore);
    Py_DECREF(zset);
    if (rc == 0 && wrote(e, s, db, command, key) == 0)
        result = PyLong_FromLong(added);
done:
    PyMem_Free(scores);
    Py_XDECREF(bylex);
    Py_XDECREF(db);
    Py_XDECREF(dict);
    return result;
}

static PyObject *
c_zrem(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    Py_ssize_t n = NARGS(command);
    if (n < 3)
        return defer();
    PyObject *db, *dict, *item, *zset = NULL, *bylex = NULL, *byscore = NULL, *result = NULL, *key = ARG(command, 1);
    if (database(s, &db, &dict) < 0)
        return NULL;
    if (lookup(e, dict, key, &item) < 0)
        goto done;
    if (item == NULL) {
        result = PyLong_FromLong(0);
        goto done;
    }
    zset = SLOT(item, e->value_offset);
    if (zset == NULL || !PyObject_TypeCheck(zset, (PyTypeObject *)e->zset_type)) {
        zset = NULL;
        result = new_ref(e->wrongtype);
        goto done;
    }
    Py_INCREF(zset);
    bylex = PyObject_GetAttr(zset, s_bylex);
    if (bylex == NULL)
        goto done;
    if (!PyDict_Check(bylex)) {
        PyErr_SetString(PyExc_TypeError, "a ZSet's _bylex is not a dict");
        goto done;
    }
    byscore = PyObject_GetAttr(zset, s_byscore);
    if (byscore == NULL)
        goto done;
    long removed = 0;
    for (Py_ssize_t at = 2; at < n; at++) { /* ZSet.discard, on its two structures */
        PyObject *member = ARG(command, at);
        PyObject *score = PyDict_GetItemWithError(bylex, member);
        if (score == NULL) {
            if (PyErr_Occurred())
                goto done;
            continue;
        }
        Py_INCREF(score);
        int rc = PyDict_DelItem(bylex, member);
        PyObject *r = rc < 0 ? NULL : zset_entry_call(byscore, s_remove_entry, score, member);
        Py_DECREF(score);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
        removed++;
    }
    if (PyDict_GET_SIZE(bylex) == 0) {
        keep_spare(e->spare_zsets, zset, e->zset_type, EMPTY_ZSET);
        if (PyDict_DelItem(dict, key) < 0)
            goto done;
    }
    if (removed && wrote(e, s, db, command, key) < 0)
        goto done;
    result = PyLong_FromLong(removed);
done:
    Py_XDECREF(zset);
    Py_XDECREF(bylex);
    Py_XDECREF(byscore);
    Py_DECREF(db);
    Py_DECREF(dict);
    return result;
}

/* a pushed message, [kind, channel, third] (RESP3's ">", an array in RESP2), into a client's replies */
static int
put_push(Buf *b, int protocol, const char *kind, PyObject *channel, PyObject *message, long long count)
{
    if (buf_head(b, protocol == 3 ? '>' : '*', 3) < 0 || buf_bulk(b, kind, strlen(kind)) < 0
        || buf_bulk(b, PyBytes_AS_STRING(channel), PyBytes_GET_SIZE(channel)) < 0)
        return -1;
    if (message != NULL)
        return buf_bulk(b, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message));
    return buf_head(b, ':', count);
}

static PyObject *Session_reply(Session *s, PyObject *message);
static int mark_dirty(Engine *e, Session *s);

/* the compiled session a client's replies go to (new), if they go straight to one: NULL if not */
static Session *
session_of(PyObject *sock)
{
    PyObject *on_reply = PyObject_GetAttr(sock, s_on_reply);
    if (on_reply == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Session *target = NULL;
    if (PyCFunction_Check(on_reply) && ((PyCFunctionObject *)on_reply)->m_ml->ml_meth == (PyCFunction)Session_reply) {
        target = (Session *)PyCFunction_GET_SELF(on_reply);
        Py_INCREF(target);
    }
    Py_DECREF(on_reply);
    return target;
}

static int
set_pubsub_count(PyObject *sock, long count)
{
    PyObject *value = PyLong_FromLong(count);
    int rc = value == NULL ? -1 : PyObject_SetAttr(sock, s_pubsub, value);
    Py_XDECREF(value);
    return rc;
}

/* Redis' stringmatchlen (util.c), case-sensitive: does a PSUBSCRIBE pattern match the channel */
static int
glob_match(const char *pattern, Py_ssize_t plen, const char *string, Py_ssize_t slen, int *skip_longer, int nesting)
{
    if (nesting > 1000)
        return 0; /* protection against abusive patterns, as in Redis */
    while (plen && slen) {
        switch (pattern[0]) {
        case '*':
            while (plen > 1 && pattern[1] == '*') {
                pattern++;
                plen--;
            }
            if (plen == 1)
                return 1;
            while (slen) {
                if (glob_match(pattern + 1, plen - 1, string, slen, skip_longer, nesting + 1))
                    return 1;
                if (*skip_longer)
                    return 0;
                string++;
                slen--;
            }
            *skip_longer = 1;
            return 0;
        case '?':
            string++;
            slen--;
            break;
        case '[': {
            int negate, match = 0;
            pattern++;
            plen--;
            negate = plen > 0 && pattern[0] == '^';
            if (negate) {
                pattern++;
                plen--;
            }
            for (;;) {
                if (plen >= 2 && pattern[0] == '\\') {
                    pattern++;
                    plen--;
                    if (pattern[0] == string[0])
                        match = 1;
                }
                else if (plen == 0) {
                    pattern--;
                    plen++;
                    break;
                }
                else if (pattern[0] == ']')
                    break;
                else if (plen >= 3 && pattern[1] == '-') {
                    unsigned char start = pattern[0], end = pattern[2], c = string[0];
                    if (start > end) {
                        unsigned char t = start;
                        start = end;
                        end = t;
                    }
                    pattern += 2;
                    plen -= 2;
                    if (c >= start && c <= end)
                        match = 1;
                }
                else if (pattern[0] == string[0])
                    match = 1;
                pattern++;
                plen--;
            }
            if (negate)
                match = !match;
            if (!match)
                return 0;
            string++;
            slen--;
            break;
        }
        case '\\':
            if (plen >= 2) {
                pattern++;
                plen--;
            }
            /* fall through */
        default:
            if (pattern[0] != string[0])
                return 0;
            string++;
            slen--;
            break;
        }
        pattern++;
        plen--;
        if (slen == 0) {
            while (plen > 0 && *pattern == '*') {
                pattern++;
                plen--;
            }
            break;
        }
    }
    return plen == 0 && slen == 0;
}

/* one message pushed to one subscriber: [kind, (pattern,) channel, message] */
static int
push_to(Engine *e, PyObject *subscriber, PyObject *pattern, PyObject *channel, PyObject *message)
{
    Session *target = session_of(subscriber);
    if (target != NULL) {
        Buf *b = &target->out;
        int rc = buf_head(b, target->protocol == 3 ? '>' : '*', pattern ? 4 : 3);
        if (rc == 0)
            rc = pattern ? buf_lit(b, "$8\r\npmessage\r\n") : buf_lit(b, "$7\r\nmessage\r\n");
        if (rc == 0 && pattern)
            rc = buf_bulk(b, PyBytes_AS_STRING(pattern), PyBytes_GET_SIZE(pattern));
        if (rc == 0)
            rc = buf_bulk(b, PyBytes_AS_STRING(channel), PyBytes_GET_SIZE(channel));
        if (rc == 0)
            rc = buf_bulk(b, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message));
        if (rc == 0)
            rc = mark_dirty(e, target);
        Py_DECREF(target);
        return rc;
    }
    /* replies captured or redirected: through the socket, as fakeredis sends them */
    PyObject *parts = pattern ? Py_BuildValue("[yOOO]", "pmessage", pattern, channel, message)
                              : Py_BuildValue("[yOO]", "message", channel, message);
    PyObject *push = parts == NULL ? NULL : PyObject_CallOneArg(e->push_type, parts);
    Py_XDECREF(parts);
    PyObject *r = push == NULL ? NULL : PyObject_CallMethod(subscriber, "put_response", "O", push);
    Py_XDECREF(push);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* each live subscriber in a WeakSet (a snapshot: a reply may unsubscribe); -1 or how many got it */
static long
push_to_all(Engine *e, PyObject *subs, PyObject *pattern, PyObject *channel, PyObject *message)
{
    PyObject *data = PyObject_GetAttr(subs, s_data);
    PyObject *snapshot = data == NULL ? NULL : PySequence_List(data);
    Py_XDECREF(data);
    if (snapshot == NULL)
        return -1;
    long receivers = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(snapshot); i++) {
        PyObject *subscriber = PyWeakref_GetObject(PyList_GET_ITEM(snapshot, i));
        if (subscriber == NULL) {
            receivers = -1;
            break;
        }
        if (subscriber == Py_None)
            continue;
        Py_INCREF(subscriber);
        int rc = push_to(e, subscriber, pattern, channel, message);
        Py_DECREF(subscriber);
        if (rc < 0) {
            receivers = -1;
            break;
        }
        receivers++;
    }
    Py_DECREF(snapshot);
    return receivers;
}

/* core.deliver: PUBLISH to the channel's subscribers, then to those of every pattern it matches */
static PyObject *
c_publish(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) != 3)
        return defer();
    PyObject *channel = ARG(command, 1), *message = ARG(command, 2);
    long receivers = 0;
    PyObject *subscribers = PyObject_GetAttr(e->core, s_subscribers);
    if (subscribers == NULL)
        return NULL;
    PyObject *subs = PyDict_GetItemWithError(subscribers, channel);
    if (subs != NULL) {
        Py_INCREF(subs);
        receivers = push_to_all(e, subs, NULL, channel, message);
        Py_DECREF(subs);
    }
    else if (PyErr_Occurred())
        receivers = -1;
    Py_DECREF(subscribers);
    if (receivers < 0)
        return NULL;
    PyObject *patterns = PyObject_GetAttr(e->core, s_psubscribers);
    PyObject *items = patterns == NULL ? NULL : PyDict_Check(patterns) ? PyDict_Items(patterns) : NULL;
    if (items == NULL && patterns != NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "fakeredis' psubscribers is not a dict");
    Py_XDECREF(patterns);
    if (items == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *pattern = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *pattern_subs = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        int skip = 0;
        if (!PyBytes_Check(pattern) || !glob_match(PyBytes_AS_STRING(pattern), PyBytes_GET_SIZE(pattern),
                                                   PyBytes_AS_STRING(channel), PyBytes_GET_SIZE(channel), &skip, 0))
            continue;
        long more = push_to_all(e, pattern_subs, pattern, channel, message);
        if (more < 0) {
            Py_DECREF(items);
            return NULL;
        }
        receivers += more;
    }
    Py_DECREF(items);
    return PyLong_FromLong(receivers);
}

/* FastPath.subscribe + BrokerSocket._subscribe: fakeredis' WeakSets, a confirmation per channel */
static PyObject *
c_subscribe(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) < 2)
        return defer();
    if (know_sock(s) < 0)
        return NULL;
    long count = s->known_pubsub;
    PyObject *subscribers = PyObject_GetAttr(e->core, s_subscribers);
    if (subscribers == NULL)
        return NULL;
    PyObject *me = PyWeakref_NewRef(sock, NULL);
    int rc = me == NULL ? -1 : 0;
    for (Py_ssize_t i = 1; rc == 0 && i < NARGS(command); i++) {
        PyObject *channel = ARG(command, i);
        PyObject *subs = PyDict_GetItemWithError(subscribers, channel);
        if (subs != NULL)
            Py_INCREF(subs);
        else if (!PyErr_Occurred()) { /* a new channel's WeakSet (the defaultdict's own would be new) */
            subs = take_spare(e->spare_channels, e->weakset_type);
            if (subs != NULL && PyDict_SetItem(subscribers, channel, subs) < 0)
                Py_CLEAR(subs);
        }
        PyObject *data = subs == NULL ? NULL : PyObject_GetAttr(subs, s_data);
        int there = data == NULL ? -1 : PySet_Contains(data, me);
        rc = there < 0 ? -1 : 0;
        if (there == 0) { /* WeakSet.add(sock) */
            PyObject *pending = PyObject_GetAttr(subs, s_pending_removals);
            int commit = pending == NULL ? -1 : PyObject_IsTrue(pending);
            Py_XDECREF(pending);
            if (commit > 0) {
                PyObject *r = PyObject_CallMethodNoArgs(subs, s_commit_removals);
                commit = r == NULL ? -1 : 0;
                Py_XDECREF(r);
            }
            PyObject *remove = commit < 0 ? NULL : PyObject_GetAttr(subs, s_remove);
            PyObject *reference = remove == NULL ? NULL : PyWeakref_NewRef(sock, remove);
            rc = reference == NULL ? -1 : PySet_Add(data, reference);
            Py_XDECREF(remove);
            Py_XDECREF(reference);
            if (rc == 0)
                rc = set_pubsub_count(sock, ++count);
            s->known_pubsub = count;
        }
        if (rc == 0)
            rc = put_push(&s->out, s->protocol, "subscribe", channel, NULL, count);
        Py_XDECREF(data);
        Py_XDECREF(subs);
    }
    Py_XDECREF(me);
    Py_DECREF(subscribers);
    if (rc < 0 || mark_dirty(e, s) < 0)
        return NULL;
    return new_ref(e->no_reply);
}

/* FastPath.unsubscribe + BrokerSocket._unsubscribe, for the channels named */
static PyObject *
c_unsubscribe(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    if (NARGS(command) < 2)
        return defer(); /* from every channel: fakeredis works out which */
    if (know_sock(s) < 0)
        return NULL;
    long count = s->known_pubsub;
    PyObject *subscribers = PyObject_GetAttr(e->core, s_subscribers);
    if (subscribers == NULL)
        return NULL;
    PyObject *me = PyWeakref_NewRef(sock, NULL);
    int rc = me == NULL ? -1 : 0;
    for (Py_ssize_t i = 1; rc == 0 && i < NARGS(command); i++) {
        PyObject *channel = ARG(command, i);
        PyObject *subs = PyDict_GetItemWithError(subscribers, channel);
        if (subs == NULL && PyErr_Occurred()) {
            rc = -1;
            break;
        }
        if (subs != NULL) {
            Py_INCREF(subs);
            PyObject *data = PyObject_GetAttr(subs, s_data);
            int there = data == NULL ? -1 : PySet_Contains(data, me);
            if (there < 0)
                rc = -1;
            else if (there) {
                rc = PySet_Discard(data, me) < 0 ? -1 : 0;
                if (rc == 0 && PySet_GET_SIZE(data) == 0) {
                    keep_spare(e->spare_channels, subs, e->weakset_type, EMPTY_CHANNEL);
                    rc = PyDict_DelItem(subscribers, channel);
                }
                if (rc == 0)
                    rc = set_pubsub_count(sock, --count);
                s->known_pubsub = count;
            }
            Py_XDECREF(data);
            Py_DECREF(subs);
        }
        if (rc == 0)
            rc = put_push(&s->out, s->protocol, "unsubscribe", channel, NULL, count);
    }
    Py_XDECREF(me);
    Py_DECREF(subscribers);
    if (rc < 0 || mark_dirty(e, s) < 0)
        return NULL;
    return new_ref(e->no_reply);
}

static PyObject *
c_ping(Engine *e, Session *s, PyObject *sock, PyObject *command)
{
    return NARGS(command) == 1 ? new_ref(e->pong) : defer();
}

static const struct {
    const char *name;
    native_fn fn;
} NATIVE[] = {
    {"get", c_get}, {"set", c_set}, {"setex", c_setex}, {"lpush", c_lpush}, {"rpush", c_rpush},
    {"brpop", c_brpop}, {"blpop", c_blpop}, {"hset", c_hset}, {"hdel", c_hdel}, {"zadd", c_zadd},
    {"zrem", c_zrem}, {"publish", c_publish}, {"ping", c_ping}, {"subscribe", c_subscribe},
    {"unsubscribe", c_unsubscribe}, {NULL, NULL},
};

/* ---------------------------------------------------------------------------------------------
 * Engine
 */

static int
Engine_traverse(Engine *e, visitproc visit, void *arg)
{
    Py_VISIT(e->server); Py_VISIT(e->core); Py_VISIT(e->aof); Py_VISIT(e->dirty); Py_VISIT(e->parked);
    Py_VISIT(e->touched); Py_VISIT(e->waiting); Py_VISIT(e->handlers); Py_VISIT(e->item_type);
    Py_VISIT(e->hash_type); Py_VISIT(e->zset_type); Py_VISIT(e->push_type); Py_VISIT(e->simple_string);
    Py_VISIT(e->simple_error); Py_VISIT(e->defer); Py_VISIT(e->ok); Py_VISIT(e->queued);
    Py_VISIT(e->no_reply); Py_VISIT(e->pong); Py_VISIT(e->wrongtype); Py_VISIT(e->not_a_float);
    Py_VISIT(e->multi_nested); Py_VISIT(e->encode); Py_VISIT(e->redis_double);
    Py_VISIT(e->zadd_options); Py_VISIT(e->watched_changed); Py_VISIT(e->pubsub_allowed);
    Py_VISIT(e->log); Py_VISIT(e->weakset_type); Py_VISIT(e->spare_hashes); Py_VISIT(e->spare_zsets);
    Py_VISIT(e->spare_channels); Py_VISIT(e->hold);
    return 0;
}

static int
Engine_clear(Engine *e)
{
    e->ncommands = 0; /* their Python handlers are borrowed from `handlers` */
    memset(e->bucket_sizes, 0, sizeof e->bucket_sizes);
    Py_CLEAR(e->server); Py_CLEAR(e->core); Py_CLEAR(e->aof); Py_CLEAR(e->dirty); Py_CLEAR(e->parked);
    Py_CLEAR(e->touched); Py_CLEAR(e->waiting); Py_CLEAR(e->handlers); Py_CLEAR(e->item_type);
    Py_CLEAR(e->hash_type); Py_CLEAR(e->zset_type); Py_CLEAR(e->push_type); Py_CLEAR(e->simple_string);
    Py_CLEAR(e->simple_error); Py_CLEAR(e->defer); Py_CLEAR(e->ok); Py_CLEAR(e->queued);
    Py_CLEAR(e->no_reply); Py_CLEAR(e->pong); Py_CLEAR(e->wrongtype); Py_CLEAR(e->not_a_float);
    Py_CLEAR(e->multi_nested); Py_CLEAR(e->encode); Py_CLEAR(e->redis_double);
    Py_CLEAR(e->zadd_options); Py_CLEAR(e->watched_changed); Py_CLEAR(e->pubsub_allowed);
    Py_CLEAR(e->log); Py_CLEAR(e->weakset_type); Py_CLEAR(e->spare_hashes); Py_CLEAR(e->spare_zsets);
    Py_CLEAR(e->spare_channels); Py_CLEAR(e->hold);
    return 0;
}

static void
Engine_dealloc(Engine *e)
{
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static Py_ssize_t
slot_offset(PyObject *type, const char *name)
{
    PyObject *descriptor = PyObject_GetAttrString(type, name);
    if (descriptor == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type == T_OBJECT_EX || member->type == T_OBJECT)
            offset = member->offset;
    }
    Py_DECREF(descriptor);
    if (offset < 0)
        PyErr_Format(PyExc_TypeError, "fakeredis' Item.%s is not a slot: this fakeredis is not supported", name);
    return offset;
}

static int
add_command(Engine *e, const char *name, Py_ssize_t len, int kind, native_fn native, PyObject *python)
{
    if (e->ncommands >= MAX_COMMANDS || len >= MAX_NAME) {
        PyErr_Format(PyExc_ValueError, "too many fast commands, or too long a name (%s)", name);
        return -1;
    }
    int bucket = (name[0] | 0x20) & (BUCKETS - 1);
    if (len == 0 || e->bucket_sizes[bucket] >= PER_BUCKET) {
        PyErr_Format(PyExc_ValueError, "no room for the fast command %s", name);
        return -1;
    }
    Command *c = &e->commands[e->ncommands++];
    e->buckets[bucket][e->bucket_sizes[bucket]++] = c;
    memcpy(c->name, name, len);
    c->name[len] = 0;
    c->len = len;
    c->kind = kind;
    c->native = native;
    c->python = python;
    PyObject *word = PyBytes_FromStringAndSize(name, len);
    if (word == NULL)
        return -1;
    c->pubsub_ok = PySequence_Contains(e->pubsub_allowed, word);
    Py_DECREF(word);
    return c->pubsub_ok < 0 ? -1 : 0;
}

static int
Engine_init(Engine *e, PyObject *args, PyObject *kwargs)
{
    static const char *names[] = {
        "server", "core", "aof", "dirty", "parked", "touched", "waiting", "handlers", "item_type",
        "hash_type", "zset_type", "push_type", "simple_string", "simple_error", "defer", "ok", "queued",
        "no_reply", "pong", "wrongtype", "not_a_float", "multi_nested", "encode",
        "redis_double", "zadd_options", "watched_changed", "pubsub_allowed", "weakset_type", "hold", NULL};
    PyObject **fields[] = {
        &e->server, &e->core, &e->aof, &e->dirty, &e->parked, &e->touched, &e->waiting, &e->handlers,
        &e->item_type, &e->hash_type, &e->zset_type, &e->push_type, &e->simple_string, &e->simple_error,
        &e->defer, &e->ok, &e->queued, &e->no_reply, &e->pong, &e->wrongtype, &e->not_a_float,
        &e->multi_nested, &e->encode, &e->redis_double, &e->zadd_options, &e->watched_changed,
        &e->pubsub_allowed, &e->weakset_type, &e->hold};
    if (PyTuple_GET_SIZE(args) || kwargs == NULL) {
        PyErr_SetString(PyExc_TypeError, "Engine() takes keyword arguments only");
        return -1;
    }
    Engine_clear(e);
    for (int i = 0; names[i]; i++) {
        PyObject *value = PyDict_GetItemString(kwargs, names[i]);
        if (value == NULL) {
            PyErr_Format(PyExc_TypeError, "Engine() needs %s", names[i]);
            return -1;
        }
        Py_INCREF(value);
        *fields[i] = value;
    }
    if (!PyDict_Check(e->dirty) || !PyDict_Check(e->parked) || !PySet_Check(e->touched)
        || !PyDict_Check(e->waiting) || !PyDict_Check(e->handlers) || !PyType_Check(e->item_type)
        || !PyType_Check(e->hash_type) || !PyType_Check(e->zset_type) || !PyType_Check(e->push_type)
        || !PyType_Check(e->simple_string)) {
        PyErr_SetString(PyExc_TypeError, "Engine(): a container or type of the wrong kind");
        return -1;
    }
    if ((e->spare_hashes = PyList_New(0)) == NULL || (e->spare_zsets = PyList_New(0)) == NULL
        || (e->spare_channels = PyList_New(0)) == NULL)
        return -1;
    if (e->aof != Py_None) {
        PyObject *buffer = PyObject_GetAttrString(e->aof, "buffer");
        if (buffer == NULL)
            return -1;
        if (Py_IS_TYPE(buffer, &LogBufferType))
            e->log = (LogBuffer *)buffer;
        else
            Py_DECREF(buffer);
    }
    if ((e->value_offset = slot_offset(e->item_type, "value")) < 0
        || (e->expireat_offset = slot_offset(e->item_type, "expireat")) < 0)
        return -1;
    /* the fast path's commands: those written here run here, the others through their Python */
    PyObject *name, *handler;
    Py_ssize_t position = 0;
    while (PyDict_Next(e->handlers, &position, &name, &handler)) {
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "Engine(): handler names must be bytes");
            return -1;
        }
        native_fn native = NULL;
        for (int i = 0; NATIVE[i].name; i++)
            if (strcmp(NATIVE[i].name, PyBytes_AS_STRING(name)) == 0)
                native = NATIVE[i].fn;
        if (add_command(e, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), K_FAST, native, handler) < 0)
            return -1;
    }
    if (add_command(e, "brpop", 5, K_POP, c_brpop, NULL) < 0 || add_command(e, "blpop", 5, K_POP, c_blpop, NULL) < 0
        || add_command(e, "multi", 5, K_MULTI, NULL, NULL) < 0 || add_command(e, "exec", 4, K_EXEC, NULL, NULL) < 0
        || add_command(e, "discard", 7, K_DISCARD, NULL, NULL) < 0)
        return -1;
    return 0;
}

/* the command's entry (NULL: none of the fast path's) by its name in any case */
static Command *
find_command(Engine *e, PyObject *raw)
{
    Py_ssize_t len = PyBytes_GET_SIZE(raw);
    if (len == 0 || len >= MAX_NAME)
        return NULL;
    const char *s = PyBytes_AS_STRING(raw);
    int bucket = (s[0] | 0x20) & (BUCKETS - 1);
    for (int i = 0; i < e->bucket_sizes[bucket]; i++) {
        Command *c = e->buckets[bucket][i];
        if (c->len != len)
            continue;
        Py_ssize_t at = 0;
        while (at < len && ((s[at] >= 'A' && s[at] <= 'Z') ? s[at] + 32 : s[at]) == c->name[at])
            at++;
        if (at == len)
            return c;
    }
    return NULL;
}

static PyObject *Engine_after_batch(Engine *e, PyObject *unused);

static PyMemberDef Engine_members[] = {
    {"halted", T_BOOL, offsetof(Engine, halted), 0, "writes refused: the log cannot be written"},
    {"check_kills", T_BOOL, offsetof(Engine, check_kills), 0, "after the batch, close the clients CLIENT KILL marked"},
    {"commands_processed", T_LONGLONG, offsetof(Engine, commands_processed), READONLY, NULL},
    {NULL},
};

static PyMethodDef Engine_methods[] = {
    {"after_batch", (PyCFunction)Engine_after_batch, METH_NOARGS, "EmbeddedBroker.after_batch, in C"},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runner.broker._session.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The broker as the compiled sessions see it (session.engine_for).",
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
    .tp_members = Engine_members,
    .tp_methods = Engine_methods,
};

/* ---------------------------------------------------------------------------------------------
 * Session: one client's read loop (session.PySession)
 */


#define IS_NONE(o) ((o) == NULL || (o) == Py_None)

static Engine *
engine_of(Session *s)
{
    if (s->engine == NULL || !Py_IS_TYPE(s->engine, &EngineType)) {
        PyErr_SetString(PyExc_TypeError, "the session has no engine (set session.engine = server.engine)");
        return NULL;
    }
    return (Engine *)s->engine;
}

static int
mark_dirty(Engine *e, Session *s)
{
    return PyDict_SetItem(e->dirty, (PyObject *)s, Py_None);
}

static int
append_out(Session *s, const char *data, Py_ssize_t n)
{
    return buf_put(&s->out, data, n);
}

static int
reply_into(Engine *e, Session *s, PyObject *message) /* PySession.reply, less the dirty mark */
{
    if (message == e->no_reply)
        return 0;
    return encode_into(e, &s->out, message, s->protocol);
}

/* the exception being raised, handed to connection.failed(command, error): the command fails,
 * not the connection; anything but an Exception (KeyboardInterrupt) goes on up */
static int
call_failed(Session *s, PyObject *command)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    PyObject *r = PyObject_CallMethodObjArgs((PyObject *)s, s_failed, command, value ? value : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The next command: 1 and *command (a new list of bytes), 0 if it has not all arrived, -1 with
 * `error` for bytes that are not the protocol (or with a Python exception set). Arrays of bulk
 * strings as Redis reads them, or a line of words (a client typing inline commands). */
static int
next_command(Session *s, PyObject **command, char *error, size_t size)
{
    *command = NULL;
    error[0] = 0;
    for (;;) {
        const char *buf = s->in.data;
        Py_ssize_t start = s->in_start, end = s->in.len;
        if (start >= end)
            return 0;
        if (buf[start] != '*') { /* inline: one line of words */
            const char *newline = memchr(buf + start, '\n', end - start);
            if (newline == NULL) {
                if (end - start > MAX_INLINE) {
                    snprintf(error, size, "too big inline request");
                    return -1;
                }
                return 0;
            }
            Py_ssize_t stop = newline - buf;
            PyObject *words = PyList_New(0);
            if (words == NULL)
                return -1;
            Py_ssize_t at = start;
            while (at < stop) {
                while (at < stop && strchr(" \t\r\n\v\f", buf[at]) && buf[at])
                    at++;
                Py_ssize_t word = at;
                while (at < stop && !(strchr(" \t\r\n\v\f", buf[at]) && buf[at]))
                    at++;
                if (at > word) {
                    PyObject *text = PyBytes_FromStringAndSize(buf + word, at - word);
                    if (text == NULL || PyList_Append(words, text) < 0) {
                        Py_XDECREF(text);
                        Py_DECREF(words);
                        return -1;
                    }
                    Py_DECREF(text);
                }
            }
            s->in_start = stop + 1;
            if (PyList_GET_SIZE(words) == 0) {
                Py_DECREF(words);
                continue;
            }
            *command = words;
            return 1;
        }
        /* "*<count>\r\n" then count times "$<length>\r\n<bytes>\r\n": checked whole first */
        const char *cr = memchr(buf + start, '\r', end - start);
        if (cr == NULL || cr + 1 >= buf + end) {
            if (end - start > MAX_INLINE) {
                snprintf(error, size, "too big mbulk count string");
                return -1;
            }
            return 0;
        }
        if (cr[1] != '\n') {
            snprintf(error, size, "invalid multibulk length");
            return -1;
        }
        const char *digit = buf + start + 1;
        int negative = digit < cr && *digit == '-';
        digit += negative;
        if (digit == cr || cr - digit > 9) {
            snprintf(error, size, "invalid multibulk length");
            return -1;
        }
        long count = 0;
        for (; digit < cr; digit++) {
            if (*digit < '0' || *digit > '9') {
                snprintf(error, size, "invalid multibulk length");
                return -1;
            }
            count = count * 10 + (*digit - '0');
        }
        if (count > MAX_ARRAY) {
            snprintf(error, size, "invalid multibulk length");
            return -1;
        }
        Py_ssize_t position = cr - buf + 2;
        if (negative || count == 0) { /* Redis ignores an empty (or null) array */
            s->in_start = position;
            continue;
        }
        Py_ssize_t first = position;
        for (long i = 0; i < count; i++) {
            if (position >= end)
                return 0;
            if (buf[position] != '$') {
                char got = buf[position];
                snprintf(error, size, "expected '$', got '%c'", got > 32 && got < 127 ? got : '?');
                return -1;
            }
            const char *lcr = memchr(buf + position, '\r', end - position);
            if (lcr == NULL || lcr + 1 >= buf + end) {
                if (end - position > MAX_INLINE) {
                    snprintf(error, size, "too big bulk count string");
                    return -1;
                }
                return 0;
            }
            const char *d = buf + position + 1;
            if (lcr[1] != '\n' || d == lcr || lcr - d > 10) {
                snprintf(error, size, "invalid bulk length");
                return -1;
            }
            long long length = 0;
            for (; d < lcr; d++) {
                if (*d < '0' || *d > '9') {
                    snprintf(error, size, "invalid bulk length");
                    return -1;
                }
                length = length * 10 + (*d - '0');
            }
            if (length > MAX_BULK) {
                snprintf(error, size, "invalid bulk length");
                return -1;
            }
            Py_ssize_t data_end = (lcr - buf) + 2 + (Py_ssize_t)length;
            if (data_end + 2 > end)
                return 0;
            if (buf[data_end] != '\r' || buf[data_end + 1] != '\n') {
                snprintf(error, size, "bulk string not terminated by CRLF");
                return -1;
            }
            position = data_end + 2;
        }
        PyObject *fields = PyList_New(count);
        if (fields == NULL)
            return -1;
        position = first;
        for (long i = 0; i < count; i++) {
            const char *lcr = memchr(buf + position, '\r', end - position);
            long long length = 0;
            for (const char *d = buf + position + 1; d < lcr; d++)
                length = length * 10 + (*d - '0');
            Py_ssize_t data_start = (lcr - buf) + 2;
            PyObject *field = PyBytes_FromStringAndSize(buf + data_start, (Py_ssize_t)length);
            if (field == NULL) {
                Py_DECREF(fields);
                return -1;
            }
            PyList_SET_ITEM(fields, i, field);
            position = data_start + (Py_ssize_t)length + 2;
        }
        s->in_start = position;
        *command = fields;
        return 1;
    }
}

/* run a fast-path command: its reply (new), DEFER, or NULL with an exception */
static PyObject *
run_fast(Engine *e, Command *c, Session *s, PyObject *sock, PyObject *command)
{
    if (c->native != NULL)
        return c->native(e, s, sock, command);
    PyObject *result = PyObject_CallFunctionObjArgs(c->python, sock, command, NULL);
    if (result == NULL && PyErr_ExceptionMatches(e->defer)) {
        PyErr_Clear();
        return defer();
    }
    return result;
}

/* PySession.finish_fast_multi: EXEC, DISCARD or a nested MULTI inside a fast-path MULTI */
static int
finish_fast_multi(Engine *e, Session *s, int kind)
{
    if (kind == K_MULTI) {
        if (reply_into(e, s, e->multi_nested) < 0)
            return -1;
        return mark_dirty(e, s);
    }
    PyObject *queued = s->fast_multi;
    s->fast_multi = NULL;
    if (kind == K_DISCARD) {
        Py_XDECREF(queued);
        if (append_out(s, "+OK\r\n", 5) < 0)
            return -1;
        return mark_dirty(e, s);
    }
    if (queued == NULL || !PyList_Check(queued)) {
        Py_XDECREF(queued);
        PyErr_SetString(PyExc_RuntimeError, "EXEC without a fast-path MULTI");
        return -1;
    }
    if (e->log != NULL)
        log_begin_group(e->log);
    else if (e->aof != Py_None) {
        PyObject *r = PyObject_CallMethodNoArgs(e->aof, s_begin_group);
        if (r == NULL) {
            Py_DECREF(queued);
            return -1;
        }
        Py_DECREF(r);
    }
    /* one after another with nothing in between: the loop is single-threaded */
    Buf replies = {0};
    int rc = buf_head(&replies, '*', PyList_GET_SIZE(queued));
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(queued); i++) {
        PyObject *entry = PyList_GET_ITEM(queued, i);
        Command *c = find_command(e, PyList_GET_ITEM(entry, 0));
        if (c == NULL || c->kind != K_FAST) {
            PyErr_SetObject(PyExc_KeyError, PyList_GET_ITEM(entry, 0));
            rc = -1;
            break;
        }
        PyObject *result = run_fast(e, c, s, s->sock, entry);
        if (result == DEFER) {
            Py_DECREF(result);
            result = PyObject_CallMethodObjArgs(e->server, s_attempt, (PyObject *)s, entry, NULL);
        }
        if (result == NULL) {
            rc = -1;
            break;
        }
        rc = encode_into(e, &replies, result, s->protocol);
        Py_DECREF(result);
    }
    if (rc == 0)
        rc = append_out(s, replies.data, replies.len);
    if (rc == 0)
        rc = mark_dirty(e, s);
    buf_free(&replies);
    Py_DECREF(queued);
    if (e->aof != Py_None) { /* the group ends whatever happened: keep the first error */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *r = e->log != NULL ? (log_end_group(e->log) < 0 ? NULL : new_ref(Py_None))
                                     : PyObject_CallMethodNoArgs(e->aof, s_end_group);
        if (r == NULL) {
            if (type != NULL)
                PyErr_Clear();
            else
                rc = -1;
        }
        Py_XDECREF(r);
        if (type != NULL)
            PyErr_Restore(type, value, traceback);
    }
    return rc;
}

/* PySession.process: run the complete commands received, until one parks this client */
static int
session_process(Session *s)
{
    Engine *e = engine_of(s);
    if (e == NULL)
        return -1;
    int replied = 0, rc = 0;
    Py_INCREF(s);
    while (IS_NONE(s->parked) && !s->closing) {
        PyObject *command;
        char error[96];
        int got = next_command(s, &command, error, sizeof error);
        if (got < 0) {
            if (PyErr_Occurred()) {
                rc = -1;
                break;
            }
            char line[160];
            int n = snprintf(line, sizeof line, "-ERR Protocol error: %s\r\n", error);
            if (append_out(s, line, n) < 0) {
                rc = -1;
                break;
            }
            replied = 1;
            s->closing = 1;
            break;
        }
        if (got == 0)
            break;
        PyObject *sock = s->sock;
        if (sock == NULL) {
            Py_DECREF(command);
            PyErr_SetString(PyExc_RuntimeError, "a session without its socket");
            rc = -1;
            break;
        }
        Py_INCREF(sock);
        Command *c = find_command(e, PyList_GET_ITEM(command, 0));
        int done = 0; /* answered here (or failed): not for execute() */
        if (c != NULL && c->kind == K_FAST) {
            if (!IS_NONE(s->fast_multi)) { /* queued by a MULTI of the fast path */
                if (PyList_Append(s->fast_multi, command) < 0 || append_out(s, "+QUEUED\r\n", 9) < 0)
                    rc = -1;
                e->commands_processed++;
                replied = 1;
                done = 1;
            }
            else if (s->fast_ready) {
                int ok = know_sock(s) < 0 ? -1 : s->known_authenticated && (!s->known_pubsub || c->pubsub_ok);
                if (ok < 0)
                    rc = -1;
                else if (ok) {
                    PyObject *result = run_fast(e, c, s, sock, command);
                    if (result == NULL) {
                        rc = call_failed(s, command);
                        done = 1;
                    }
                    else if (result != DEFER) {
                        e->commands_processed++;
                        if (result != e->no_reply)
                            rc = encode_into(e, &s->out, result, s->protocol);
                        replied = 1;
                        done = 1;
                    }
                    Py_XDECREF(result);
                }
            }
        }
        else if (c != NULL && c->kind == K_EXEC && !IS_NONE(s->fast_multi) && NARGS(command) == 1 && !e->halted) {
            /* MULTI and EXEC of the fast path's transactions (three per Celery task) */
            e->commands_processed++;
            if (finish_fast_multi(e, s, K_EXEC) < 0)
                rc = call_failed(s, command);
            done = 1;
        }
        else if (c != NULL && (c->kind == K_MULTI || c->kind == K_POP) && IS_NONE(s->fast_multi) && s->fast_ready) {
            int ok = know_sock(s) < 0 ? -1 : s->known_authenticated && !s->known_pubsub;
            if (ok < 0)
                rc = -1;
            else if (ok && c->kind == K_MULTI && NARGS(command) == 1) {
                e->commands_processed++;
                PyObject *queue = PyList_New(0);
                if (queue == NULL || append_out(s, "+OK\r\n", 5) < 0)
                    rc = -1;
                Py_XSETREF(s->fast_multi, queue);
                replied = 1;
                done = 1;
            }
            else if (ok && c->kind == K_POP) { /* the worker's BRPOP: answered, or the client parked */
                PyObject *result = c->native(e, s, sock, command);
                if (result == NULL) {
                    rc = call_failed(s, command);
                    done = 1;
                }
                else if (result != DEFER) {
                    e->commands_processed++;
                    if (result == Py_None) {
                        PyObject *r = PyObject_CallMethodObjArgs(e->server, s_park, (PyObject *)s, command, NULL);
                        if (r == NULL)
                            rc = -1;
                        Py_XDECREF(r);
                    }
                    else {
                        rc = encode_into(e, &s->out, result, s->protocol);
                        replied = 1;
                    }
                    done = 1;
                }
                Py_XDECREF(result);
            }
        }
        if (rc == 0 && !done) {
            PyObject *r = PyObject_CallMethodObjArgs(e->server, s_execute, (PyObject *)s, command, NULL);
            forget_sock(s); /* fakeredis ran it: AUTH, SELECT, HELLO... */
            if (r == NULL)
                rc = call_failed(s, command);
            Py_XDECREF(r);
        }
        Py_DECREF(sock);
        Py_DECREF(command);
        if (rc < 0)
            break;
    }
    /* what was read is gone from the buffer */
    if (s->in_start >= s->in.len) {
        s->in.len = s->in_start = 0;
        buf_trim(&s->in);
    }
    if (replied && mark_dirty(e, s) < 0)
        rc = -1;
    Py_DECREF(s);
    return rc;
}

static PyObject *
Session_process(Session *s, PyObject *unused)
{
    if (session_process(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Session_data_received(Session *s, PyObject *data)
{
    Engine *e = engine_of(s);
    if (e == NULL)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (s->in_start > 65536 && s->in_start > s->in.len / 2) {
        memmove(s->in.data, s->in.data + s->in_start, s->in.len - s->in_start);
        s->in.len -= s->in_start;
        s->in_start = 0;
    }
    int rc = buf_put(&s->in, view.buf, view.len);
    PyBuffer_Release(&view);
    if (rc < 0 || session_process(s) < 0)
        return NULL;
    return Engine_after_batch(e, NULL);
}

static PyObject *
Session_reply(Session *s, PyObject *message)
{
    Engine *e = engine_of(s);
    if (e == NULL || reply_into(e, s, message) < 0 || mark_dirty(e, s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Session_send(Session *s, PyObject *data)
{
    Engine *e = engine_of(s);
    if (e == NULL)
        return NULL;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "send() takes bytes");
        return NULL;
    }
    if (append_out(s, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) < 0 || mark_dirty(e, s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Session_finish_fast_multi(Session *s, PyObject *name)
{
    Engine *e = engine_of(s);
    if (e == NULL)
        return NULL;
    if (!PyBytes_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "finish_fast_multi() takes the command's name as bytes");
        return NULL;
    }
    int kind = equals_lower(name, "multi") ? K_MULTI : equals_lower(name, "discard") ? K_DISCARD
             : equals_lower(name, "exec") ? K_EXEC : 0;
    if (kind == 0) {
        PyErr_SetString(PyExc_ValueError, "finish_fast_multi() takes MULTI, EXEC or DISCARD");
        return NULL;
    }
    if (finish_fast_multi(e, s, kind) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* PySession.flush */
static int
session_flush(Session *s)
{
    int rc = 0;
    if (s->out.len && !IS_NONE(s->transport)) {
        PyObject *data = PyBytes_FromStringAndSize(s->out.data, s->out.len);
        if (data == NULL)
            return -1;
        s->out.len = 0;
        buf_trim(&s->out);
        if (s->write == NULL || s->write_of != s->transport) {
            Py_CLEAR(s->write);
            s->write = PyObject_GetAttr(s->transport, s_write);
            s->write_of = s->transport;
        }
        PyObject *r = s->write == NULL ? NULL : PyObject_CallOneArg(s->write, data);
        Py_DECREF(data);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    if (s->closing && !IS_NONE(s->transport)) {
        PyObject *r = PyObject_CallMethodNoArgs(s->transport, s_close);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    return rc;
}

static PyObject *
Session_flush(Session *s, PyObject *unused)
{
    if (session_flush(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* EmbeddedBroker.after_batch, step for step */
static PyObject *
Engine_after_batch(Engine *e, PyObject *unused)
{
    Py_INCREF(e);
    PyObject *result = NULL;
    if (PySet_GET_SIZE(e->touched)) {
        if (PyDict_GET_SIZE(e->parked)) {
            PyObject *r = PyObject_CallMethodNoArgs(e->server, s_serve_parked);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
        }
        if (PySet_Clear(e->touched) < 0)
            goto done;
    }
    if (e->aof != Py_None) {
        /* The batch's writes into the log file before any reply goes out (EmbeddedBroker.write_log):
         * here in the usual case, one write(2); in Python while the log is failing, or if this write
         * fails (it is tried again there, and the replies waiting on it are held back). */
        LogBuffer *lb = e->log;
        int slow = lb == NULL || e->halted || lb->fd < 0 || (lb->parts.len && log_write(lb) < 0);
        if (!slow) { /* the log's health, which the fsync thread may change */
            PyObject *error = PyObject_GetAttr(e->aof, s_error);
            int failing = error == NULL ? -1 : PyObject_IsTrue(error);
            Py_XDECREF(error);
            if (failing < 0)
                goto done;
            slow = failing;
        }
        if (slow) {
            PyObject *r = PyObject_CallMethodNoArgs(e->server, s_write_log);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
        }
    }
    PyObject *connection, *ignored;
    Py_ssize_t position = 0;
    while (PyDict_Next(e->dirty, &position, &connection, &ignored)) {
        Py_INCREF(connection);
        int rc;
        if (PyObject_TypeCheck(connection, &SessionType))
            rc = session_flush((Session *)connection);
        else {
            PyObject *r = PyObject_CallMethodNoArgs(connection, s_flush);
            rc = r == NULL ? -1 : 0;
            Py_XDECREF(r);
        }
        Py_DECREF(connection);
        if (rc < 0)
            goto done;
    }
    PyDict_Clear(e->dirty);
    if (e->check_kills) {
        e->check_kills = 0;
        PyObject *r = PyObject_CallMethodNoArgs(e->server, s_close_killed);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_DECREF(e);
    return result;
}

static PyObject *
Session_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Session *s = (Session *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->fast_ready = 1;
    s->protocol = 2;
    return (PyObject *)s;
}

static int
Session_traverse(Session *s, visitproc visit, void *arg)
{
    Py_VISIT(s->server); Py_VISIT(s->engine); Py_VISIT(s->sock); Py_VISIT(s->transport);
    Py_VISIT(s->parked); Py_VISIT(s->fast_multi); Py_VISIT(s->known_db); Py_VISIT(s->known_db_num);
    Py_VISIT(s->write);
    return 0;
}

static int
Session_clear(Session *s)
{
    Py_CLEAR(s->server); Py_CLEAR(s->engine); Py_CLEAR(s->sock); Py_CLEAR(s->transport);
    Py_CLEAR(s->parked); Py_CLEAR(s->fast_multi);
    forget_sock(s);
    Py_CLEAR(s->write);
    return 0;
}

static void
Session_dealloc(Session *s)
{
    PyObject_GC_UnTrack(s);
    Session_clear(s);
    buf_free(&s->in);
    buf_free(&s->out);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMemberDef Session_members[] = {
    {"server", T_OBJECT, offsetof(Session, server), 0, NULL},
    {"engine", T_OBJECT, offsetof(Session, engine), 0, NULL},
    {"sock", T_OBJECT, offsetof(Session, sock), 0, NULL},
    {"transport", T_OBJECT, offsetof(Session, transport), 0, NULL},
    {"parked", T_OBJECT, offsetof(Session, parked), 0, NULL},
    {"fast_multi", T_OBJECT, offsetof(Session, fast_multi), 0, NULL},
    {"closing", T_BOOL, offsetof(Session, closing), 0, NULL},
    {"fast_ready", T_BOOL, offsetof(Session, fast_ready), 0, NULL},
    {"protocol", T_INT, offsetof(Session, protocol), 0, NULL},
    {NULL},
};

static PyMethodDef Session_methods[] = {
    {"data_received", (PyCFunction)Session_data_received, METH_O, NULL},
    {"process", (PyCFunction)Session_process, METH_NOARGS, NULL},
    {"reply", (PyCFunction)Session_reply, METH_O, NULL},
    {"send", (PyCFunction)Session_send, METH_O, NULL},
    {"finish_fast_multi", (PyCFunction)Session_finish_fast_multi, METH_O, NULL},
    {"flush", (PyCFunction)Session_flush, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runner.broker._session.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One client's read loop, compiled (session.PySession is the reference).",
    .tp_new = Session_new,
    .tp_traverse = (traverseproc)Session_traverse,
    .tp_clear = (inquiry)Session_clear,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_members = Session_members,
    .tp_methods = Session_methods,
};

/* ---------------------------------------------------------------------------------------------
 * the module
 */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_session",
    "The embedded broker's read loop in C (runner/broker/session.py has the reference).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__session(void)
{
    const char *names[] = {"_authenticated", "_pubsub", "_db", "_db_num", "_dict", "_watches", "_values",
                           "_expirations", "_expiry_heap", "_expire_keys", "_bylex", "add", "write",
                           "close", "execute", "park", "attempt", "failed", "_serve_parked",
                           "close_killed", "append", "begin_group", "end_group", "value", "flush",
                           "write_log", NULL};
    PyObject **slots[] = {&s_authenticated, &s_pubsub, &s_db, &s_db_num, &s_dict, &s_watches, &s_values,
                          &s_expirations, &s_expiry_heap, &s_expire_keys, &s_bylex, &s_add, &s_write,
                          &s_close, &s_execute, &s_park, &s_attempt, &s_failed, &s_serve_parked,
                          &s_close_killed, &s_append, &s_begin_group, &s_end_group, &s_value,
                          &s_flush, &s_write_log};
    for (int i = 0; names[i]; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    if (intern_all(EMPTY_HASH_NAMES, EMPTY_HASH) < 0 || intern_all(EMPTY_ZSET_NAMES, EMPTY_ZSET) < 0
        || intern_all(EMPTY_CHANNEL_NAMES, EMPTY_CHANNEL) < 0)
        return NULL;
    if ((s_error = PyUnicode_InternFromString("error")) == NULL
        || (s_byscore = PyUnicode_InternFromString("_byscore")) == NULL
        || (s_remove_entry = PyUnicode_InternFromString("remove")) == NULL)
        return NULL;
    const char *more[] = {"subscribers", "psubscribers", "data", "_pending_removals", "_commit_removals", "_remove",
                          "_on_reply", "schedule_expiry", NULL};
    PyObject **more_slots[] = {&s_subscribers, &s_psubscribers, &s_data, &s_pending_removals, &s_commit_removals,
                               &s_remove, &s_on_reply, &s_schedule_expiry};
    for (int i = 0; more[i]; i++)
        if ((*more_slots[i] = PyUnicode_InternFromString(more[i])) == NULL)
            return NULL;
    PyObject *heapq = PyImport_ImportModule("_heapq");
    if (heapq == NULL)
        return NULL;
    heappush = PyObject_GetAttrString(heapq, "heappush");
    Py_DECREF(heapq);
    if (heappush == NULL || (b_message = PyBytes_FromString("message")) == NULL)
        return NULL;
    if ((b_lpop = PyBytes_FromString("lpop")) == NULL || (b_rpop = PyBytes_FromString("rpop")) == NULL
        || (b_set = PyBytes_FromString("set")) == NULL || (b_pxat = PyBytes_FromString("pxat")) == NULL)
        return NULL;
    if ((DEFER = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type)) == NULL)
        return NULL;
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&SessionType) < 0 || PyType_Ready(&LogBufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    Py_INCREF(&SessionType);
    Py_INCREF(&LogBufferType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0
        || PyModule_AddObject(m, "LogBuffer", (PyObject *)&LogBufferType) < 0
        || PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0
        || PyModule_AddIntConstant(m, "API", API) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
