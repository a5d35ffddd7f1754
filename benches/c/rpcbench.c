/* rpcbench_c: what C users of rpcagent write, measured against a raw TCP
 * echo in the same run.
 *
 * Four processes: this one (the client: rank 0 of two worlds of 2, and the
 * raw echo's client), two forked rpcagent servers (rank 1 of each world)
 * and a forked raw echo server. One world is set to RPCAGENT_TRANSPORT=tcp
 * (the TCP path: sections latency, inflight, bandwidth); the other keeps
 * the default, `auto`, under which ranks on one host talk through shared
 * memory (section samehost, beside the TCP path). Every row runs its
 * rounds interleaved (rpcagent, raw, rpcagent, raw, ...) after a warm-up of
 * each, and prints the median and the [min-max] spread over the rounds of
 * both, side by side.
 *
 *   rpcbench_c [--quick] [--rounds N] [--only latency,inflight,bandwidth,samehost,cancel]
 *              [--one-cpu] [--depth N] [--variant NAME]
 *
 * --quick: tiny rounds, payloads up to 1 MiB (the ctest smoke run).
 * --one-cpu: pin all four processes (and every library thread) to CPU 0.
 * --depth N: only the in-flight rows with N calls in flight (1, 16, 128).
 * --variant NAME: only the in-flight variants whose name contains NAME
 *   (wait_any, oldest, on_complete, queue); for profiling one of them.
 *
 * The library's RPCAGENT_* environment variables apply to every rank
 * (RPCAGENT_SPIN_US, say), except RPCAGENT_TRANSPORT, which each world sets.
 *
 * Every reply is checked (length, first and last byte, which encode the
 * call's sequence number); any failed call or wrong reply prints what failed
 * and exits non-zero.
 *
 * The raw baseline is a length-prefixed echo (8-byte length, then payload)
 * over loopback with TCP_NODELAY:
 * - the server reads as much as is available into a 256 KiB buffer and
 *   answers every complete message in it with one writev (header, payload
 *   straight from its receive buffer: no copy); a message too large for that
 *   buffer is read with large reads into a pre-faulted buffer and answered
 *   with one writev;
 * - the client sends each message with one writev (header + payload, no
 *   concatenation copy) and reads replies into a reused buffer (small ones
 *   through a 256 KiB buffered reader, large ones with large reads straight
 *   into a pre-faulted buffer);
 * - latency rows also show a raw client that looks for its reply with
 *   non-blocking reads and sched_yield for up to 50 us before it blocks
 *   (rpcagent's sync callers do that; on a VM a wake-up on another CPU
 *   costs tens of us, so this wins whenever the two raw processes land on
 *   different CPUs);
 * - N in flight: one connection, N requests written up front with one
 *   write; then, in the baseline the ratio is taken against, one new request
 *   written per reply read (one write each, as each rpcagent call is issued
 *   on its own); a second column batches: every complete reply in the read
 *   buffer is taken and as many new requests go out with one write.
 * Experiment knobs (off by default; neither made the raw echo faster here):
 * RPCBENCH_RAW_SOCKBUF=bytes sets SO_SNDBUF/SO_RCVBUF on both raw sockets
 * (which switches off the kernel's autotuning), RPCBENCH_RAW_HUGE=1 puts the
 * large buffers of both sides on transparent huge pages. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rpcagent.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define MAX_ROUNDS 100
#define MAX_INFLIGHT 128
#define RAW_RBUF (256 * KiB) /* the raw sides' buffered-reader size */
#define RAW_BATCH 256        /* the raw server answers at most this many messages per writev */

/* ---------- options and process bookkeeping ---------- */

static int opt_quick, opt_rounds = 5, opt_one_cpu;
static const char *opt_variant; /* --variant: run only in-flight variants whose name contains it */
/* --depth: only this many calls in flight (for profiling one row). */
static int opt_depth;
static int want_latency = 1, want_inflight = 1, want_bandwidth = 1, want_samehost = 1, want_cancel = 1;
static int is_child;
static pid_t rpc_server_pids[2], raw_server_pid;
/* The two worlds: their transport settings, by index. */
static const char *const world_transport[2] = {"tcp", "auto"};

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "rpcbench_c%s: FAILED: ", is_child ? " (server)" : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(NULL);
    if (!is_child) {
        int status = 0;
        for (int w = 0; w < 2; w++) {
            if (rpc_server_pids[w] > 0) {
                kill(rpc_server_pids[w], SIGKILL);
                waitpid(rpc_server_pids[w], &status, 0);
            }
        }
        if (raw_server_pid > 0) {
            kill(raw_server_pid, SIGKILL);
            waitpid(raw_server_pid, &status, 0);
        }
    }
    _exit(1);
}

static void check_status(rpcagent_status_t st, const char *what) {
    if (st != RPCAGENT_OK) fail("%s returned %s: %s", what, rpcagent_status_str(st), rpcagent_last_error());
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (p == NULL) fail("out of memory (%zu bytes)", n);
    return p;
}

/* A large buffer, pre-faulted (written once). */
static void *big_alloc(size_t n, int fill) {
    void *p = NULL;
    if (getenv("RPCBENCH_RAW_HUGE")) {
        size_t rounded = (n + (2 * MiB - 1)) & ~(2 * MiB - 1);
        if (posix_memalign(&p, 2 * MiB, rounded) != 0) fail("out of memory (%zu bytes)", n);
        madvise(p, rounded, MADV_HUGEPAGE);
    } else {
        p = xmalloc(n);
    }
    memset(p, fill, n);
    return p;
}

/* ---------- payload marks: every reply is checked ---------- */

/* The first and last byte of a payload encode its call's sequence number. */
static inline uint8_t mark_first(uint64_t seq) { return (uint8_t)seq; }
static inline uint8_t mark_last(uint64_t seq) { return (uint8_t)((seq >> 8) ^ 0xa5); }

static inline void mark(uint8_t *p, size_t len, uint64_t seq) {
    p[0] = mark_first(seq);
    p[len - 1] = mark_last(seq);
}

static inline void check_reply(const uint8_t *p, size_t len, size_t want_len, uint64_t seq, const char *what) {
    if (len != want_len || p == NULL || p[0] != mark_first(seq) || p[len - 1] != mark_last(seq))
        fail("%s: wrong reply for call %llu: %zu bytes (want %zu), first/last byte %d/%d (want %u/%u)", what,
             (unsigned long long)seq, len, want_len, p && len ? p[0] : -1, p && len ? p[len - 1] : -1,
             mark_first(seq), mark_last(seq));
}

static uint64_t g_seq = 1;

/* ---------- statistics over rounds ---------- */

struct series {
    double v[MAX_ROUNDS];
    int n;
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void add(struct series *s, double v) {
    if (s->n < MAX_ROUNDS) s->v[s->n++] = v;
}
static double median(const struct series *s) {
    double t[MAX_ROUNDS];
    memcpy(t, s->v, sizeof(double) * (size_t)s->n);
    qsort(t, (size_t)s->n, sizeof(double), cmp_double);
    return s->n % 2 ? t[s->n / 2] : (t[s->n / 2 - 1] + t[s->n / 2]) / 2;
}
static double smin(const struct series *s) {
    double m = s->v[0];
    for (int i = 1; i < s->n; i++) m = s->v[i] < m ? s->v[i] : m;
    return m;
}
static double smax(const struct series *s) {
    double m = s->v[0];
    for (int i = 1; i < s->n; i++) m = s->v[i] > m ? s->v[i] : m;
    return m;
}

enum unit { US, RATE, GBPS };

static void fmt_one(char *out, size_t cap, double v, enum unit u) {
    if (u == US) snprintf(out, cap, v < 100 ? "%.1f" : "%.0f", v);
    else if (u == GBPS) snprintf(out, cap, "%.2f", v);
    else if (v < 1e4) snprintf(out, cap, "%.0f", v);
    else if (v < 1e5) snprintf(out, cap, "%.1fk", v / 1e3);
    else if (v < 1e6) snprintf(out, cap, "%.0fk", v / 1e3);
    else snprintf(out, cap, "%.2fM", v / 1e6);
}

/* "median [min-max]" */
static const char *fmt_series(char *out, size_t cap, const struct series *s, enum unit u) {
    char a[24], b[24], c[24];
    fmt_one(a, sizeof a, median(s), u);
    fmt_one(b, sizeof b, smin(s), u);
    fmt_one(c, sizeof c, smax(s), u);
    snprintf(out, cap, "%s [%s-%s]", a, b, c);
    return out;
}

/* Ratio of medians, oriented so that > 1 means rpcagent did better. */
static double better_ratio(const struct series *rpc, const struct series *raw, enum unit u) {
    return u == US ? median(raw) / median(rpc) : median(rpc) / median(raw);
}

/* ---------- raw TCP echo ---------- */

static void set_sock_opts(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) fail("TCP_NODELAY: %s", strerror(errno));
    /* A hang becomes an error instead of a stuck benchmark. */
    struct timeval tv = {.tv_sec = 120};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* Fixed socket buffers switch off the kernel's autotuning; on loopback
     * autotuning was as fast or faster (see the notes), so this is only for
     * experiments: RPCBENCH_RAW_SOCKBUF=bytes. */
    const char *sb = getenv("RPCBENCH_RAW_SOCKBUF");
    if (sb != NULL) {
        int bytes = atoi(sb);
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    }
}

static void writev_full(int fd, struct iovec *iov, int cnt, const char *what) {
    while (cnt > 0) {
        ssize_t n = writev(fd, iov, cnt);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail("raw %s: writev: %s", what, strerror(errno));
        }
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
}

/* Large reads until `len` bytes are in. */
static void read_full(int fd, uint8_t *p, size_t len, const char *what) {
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail("raw %s: read: %s", what, n == 0 ? "connection closed" : strerror(errno));
        p += n;
        len -= (size_t)n;
    }
}

/* The raw echo server: answers every message on one connection until EOF. */
static int raw_server_main(int listen_fd, size_t big_cap) {
    int fd = accept(listen_fd, NULL, NULL);
    if (fd < 0) fail("raw server: accept: %s", strerror(errno));
    close(listen_fd);
    set_sock_opts(fd);
    uint8_t *rbuf = xmalloc(RAW_RBUF);
    memset(rbuf, 0, RAW_RBUF);
    uint8_t *big = big_cap ? big_alloc(big_cap, 0) : NULL;
    static uint64_t hdrs[RAW_BATCH];
    static struct iovec iov[2 * RAW_BATCH];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, rbuf + have, RAW_RBUF - have);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("raw server: read: %s", strerror(errno));
        if (n == 0) {
            if (have != 0) fail("raw server: connection closed inside a message");
            break;
        }
        have += (size_t)n;
        size_t pos = 0;
        int k = 0;
        while (have - pos >= 8) {
            uint64_t len;
            memcpy(&len, rbuf + pos, 8);
            if (8 + len > RAW_RBUF) { /* a large message: read it straight into `big` */
                if (k > 0) writev_full(fd, iov, 2 * k, "server");
                k = 0;
                if (len > big_cap) fail("raw server: message of %llu bytes", (unsigned long long)len);
                size_t got = have - pos - 8;
                memcpy(big, rbuf + pos + 8, got);
                read_full(fd, big + got, len - got, "server");
                hdrs[0] = len;
                struct iovec one[2] = {{hdrs, 8}, {big, len}};
                writev_full(fd, one, 2, "server");
                pos = have;
                break;
            }
            if (have - pos < 8 + len) break;
            hdrs[k] = len;
            iov[2 * k] = (struct iovec){&hdrs[k], 8};
            iov[2 * k + 1] = (struct iovec){rbuf + pos + 8, len};
            pos += 8 + len;
            if (++k == RAW_BATCH) {
                writev_full(fd, iov, 2 * k, "server");
                k = 0;
            }
        }
        if (k > 0) writev_full(fd, iov, 2 * k, "server");
        if (pos > 0 && pos < have) memmove(rbuf, rbuf + pos, have - pos);
        have -= pos;
    }
    close(fd);
    free(rbuf);
    free(big);
    return 0;
}

/* The raw client's connection and buffered reader. With `spin_ns` > 0 a
 * read that would block first looks again (non-blocking, yielding the CPU
 * in between) for up to that long before it sleeps in a blocking read, as
 * rpcagent's own sync callers do. */
struct raw_conn {
    int fd;
    uint8_t *rbuf;
    size_t have, pos;
    uint64_t spin_ns;
};

static ssize_t raw_read_some(struct raw_conn *c) {
    uint8_t *p = c->rbuf + c->have;
    size_t room = RAW_RBUF - c->have;
    if (c->spin_ns > 0) {
        uint64_t until = now_ns() + c->spin_ns;
        do {
            ssize_t n = recv(c->fd, p, room, MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return n;
            sched_yield();
        } while (now_ns() < until);
    }
    return read(c->fd, p, room);
}

/* Whether a complete message is buffered. */
static int raw_buffered(const struct raw_conn *c) {
    if (c->have - c->pos < 8) return 0;
    uint64_t len;
    memcpy(&len, c->rbuf + c->pos, 8);
    return c->have - c->pos >= 8 + len;
}

/* The next message (at most RAW_RBUF bytes): its payload, in the reused buffer. */
static const uint8_t *raw_next(struct raw_conn *c, size_t *out_len) {
    for (;;) {
        size_t avail = c->have - c->pos;
        if (avail >= 8) {
            uint64_t len;
            memcpy(&len, c->rbuf + c->pos, 8);
            if (8 + len > RAW_RBUF) fail("raw client: reply of %llu bytes on the small path", (unsigned long long)len);
            if (avail >= 8 + len) {
                const uint8_t *p = c->rbuf + c->pos + 8;
                c->pos += 8 + len;
                *out_len = len;
                return p;
            }
        }
        if (c->pos > 0) {
            if (avail > 0) memmove(c->rbuf, c->rbuf + c->pos, avail);
            c->have = avail;
            c->pos = 0;
        }
        ssize_t n = raw_read_some(c);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail("raw client: read: %s", n == 0 ? "connection closed" : strerror(errno));
        c->have += (size_t)n;
    }
}

/* ---------- the rpcagent server (rank 1) ---------- */

static pthread_mutex_t stop_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stop_cv = PTHREAD_COND_INITIALIZER;
static int stop_flag;

/* Default (pool) handler answering with a copy: rpcagent_reply_set. */
static int32_t h_echo_set(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    return rpcagent_reply_set(reply, req->args, req->args_len) == RPCAGENT_OK ? 0 : 1;
}

/* Default (pool) handler filling the reply in place: rpcagent_reply_alloc + memcpy. */
static int32_t h_echo_alloc(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    if (req->args_len == 0) return 0;
    uint8_t *out = rpcagent_reply_alloc(reply, req->args_len);
    if (out == NULL) {
        rpcagent_reply_error(reply, "rpcagent_reply_alloc failed");
        return 1;
    }
    memcpy(out, req->args, req->args_len);
    return 0;
}

/* A parameter server answering with its weights, sent from where they are
 * (rpcagent_reply_set_owned: no copy; nothing to release, they live on). */
static size_t big_cap;          /* the largest payload of this run */
static uint8_t *server_weights; /* rank 1's, big_cap bytes of WEIGHT_BYTE */
#define WEIGHT_BYTE 0x77

static int32_t h_weights(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    return rpcagent_reply_set_owned(reply, server_weights, req->args_len, NULL, NULL) == RPCAGENT_OK ? 0 : 1;
}

/* A handler that works until its call is cancelled, polling
 * rpcagent_reply_cancelled every CANCEL_POLL_US, and notes when it saw it
 * (CLOCK_MONOTONIC: the client, on the same host, reads the same clock). */
#define CANCEL_POLL_US 50
static _Atomic uint64_t noticed_at_ns, started_count;

static int32_t h_until_cancelled(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    (void)req;
    atomic_fetch_add(&started_count, 1);
    uint64_t give_up = now_ns() + 10000000000ull;
    while (!rpcagent_reply_cancelled(reply)) {
        if (now_ns() > give_up) return 1;
        uint64_t next = now_ns() + CANCEL_POLL_US * 1000ull;
        while (now_ns() < next) {
        }
    }
    atomic_store(&noticed_at_ns, now_ns());
    return 0;
}

static int32_t h_noticed_at(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    (void)req;
    uint64_t t[2] = {atomic_load(&noticed_at_ns), atomic_load(&started_count)};
    return rpcagent_reply_set(reply, (const uint8_t *)t, sizeof t) == RPCAGENT_OK ? 0 : 1;
}

/* Inline handler answering with a copy (runs on the thread that read the request). */
static int32_t h_echo_inline(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    return rpcagent_reply_set(reply, req->args, req->args_len) == RPCAGENT_OK ? 0 : 1;
}

static int32_t h_stop(void *ud, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)ud;
    (void)req;
    (void)reply;
    pthread_mutex_lock(&stop_mu);
    stop_flag = 1;
    pthread_cond_signal(&stop_cv);
    pthread_mutex_unlock(&stop_mu);
    return 0;
}

static rpcagent_t *join_world(uint32_t rank, int port, const char *transport) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    if (cfg == NULL) fail("rpcagent_config_new returned NULL");
    /* RPCAGENT_* variables apply (RPCAGENT_SPIN_US, say); the world's
     * shape below is this benchmark's own. */
    check_status(rpcagent_config_from_env(cfg), "rpcagent_config_from_env");
    check_status(rpcagent_config_set_rank(cfg, rank), "rpcagent_config_set_rank");
    check_status(rpcagent_config_set_world_size(cfg, 2), "rpcagent_config_set_world_size");
    check_status(rpcagent_config_set_master(cfg, "127.0.0.1", (uint16_t)port), "rpcagent_config_set_master");
    check_status(rpcagent_config_set_init_timeout_ms(cfg, 30000), "rpcagent_config_set_init_timeout_ms");
    check_status(rpcagent_config_set_transport(cfg, transport), "rpcagent_config_set_transport");
    rpcagent_t *agent = NULL;
    check_status(rpcagent_init(cfg, &agent), "rpcagent_init");
    rpcagent_config_free(cfg);
    return agent;
}

static int rpc_server_main(int port, const char *transport) {
    rpcagent_t *agent = join_world(1, port, transport);
    check_status(rpcagent_register(agent, "echo_set", h_echo_set, NULL, NULL, 0), "register echo_set");
    check_status(rpcagent_register(agent, "echo_inline", h_echo_inline, NULL, NULL, RPCAGENT_HANDLER_INLINE),
                 "register echo_inline");
    check_status(rpcagent_register(agent, "echo_alloc", h_echo_alloc, NULL, NULL, 0), "register echo_alloc");
    check_status(rpcagent_register(agent, "stop", h_stop, NULL, NULL, 0), "register stop");
    check_status(rpcagent_register(agent, "until_cancelled", h_until_cancelled, NULL, NULL, 0),
                 "register until_cancelled");
    check_status(rpcagent_register(agent, "noticed_at", h_noticed_at, NULL, NULL, RPCAGENT_HANDLER_INLINE),
                 "register noticed_at");
    if (big_cap) {
        server_weights = big_alloc(big_cap, WEIGHT_BYTE);
        check_status(rpcagent_register(agent, "weights", h_weights, NULL, NULL, 0), "register weights");
    }
    check_status(rpcagent_start(agent), "rpcagent_start");
    check_status(rpcagent_barrier(agent, 30000), "rpcagent_barrier");
    pthread_mutex_lock(&stop_mu);
    while (!stop_flag) pthread_cond_wait(&stop_cv, &stop_mu);
    pthread_mutex_unlock(&stop_mu);
    check_status(rpcagent_shutdown(agent, 1, 30000), "rpcagent_shutdown (server)");
    rpcagent_free(agent);
    return 0;
}

/* ---------- processes ---------- */

static int port_is_free(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) fail("socket: %s", strerror(errno));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)port)};
    int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* A free port below the ephemeral range (as c_tests/harness.h picks them). */
static int free_port(int not_this) {
    unsigned start = (unsigned)getpid() % 97 * 120;
    for (unsigned i = 0; i < 12000; i++) {
        int port = 20000 + (int)((start + i) % 12000);
        if (port != not_this && port_is_free(port)) return port;
    }
    fail("no free port between 20000 and 31999");
}

static void become_child(void) {
    is_child = 1;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(1);
}

/* Forks the raw echo server; returns the port it listens on. */
static int start_raw_server(size_t big_cap) {
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(lfd, 1) != 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &alen) != 0)
        fail("raw server socket: %s", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) fail("fork: %s", strerror(errno));
    if (pid == 0) {
        become_child();
        _exit(raw_server_main(lfd, big_cap));
    }
    raw_server_pid = pid;
    close(lfd);
    return ntohs(a.sin_port);
}

static void start_rpc_server(int world, int port) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) fail("fork: %s", strerror(errno));
    if (pid == 0) {
        become_child();
        _exit(rpc_server_main(port, world_transport[world]));
    }
    rpc_server_pids[world] = pid;
}

static int raw_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)port)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) fail("raw connect: %s", strerror(errno));
    set_sock_opts(fd);
    return fd;
}

/* ---------- the client's state ---------- */

static rpcagent_t *agent; /* the world the rows call through now */
static rpcagent_t *agents[2]; /* by world: the TCP path, then `auto` (shared memory) */
static struct raw_conn raw;
static uint8_t *args_buf;  /* payloads sent (pre-faulted, shared by both sides) */
static uint8_t *raw_big;   /* the raw client's reused receive buffer for large replies */

/* ---------- section 1: sync round trips ---------- */

struct lat_result {
    double p50_us, calls_per_s;
};

static struct lat_result lat_summary(uint64_t *lat, int calls, uint64_t total_ns) {
    qsort(lat, (size_t)calls, sizeof(uint64_t), cmp_u64);
    return (struct lat_result){lat[calls / 2] / 1e3, calls / (total_ns / 1e9)};
}

static struct lat_result rpc_latency_round(const char *fn, size_t len, int calls, uint64_t *lat) {
    uint64_t start = now_ns();
    for (int i = 0; i < calls; i++) {
        uint64_t seq = g_seq++;
        mark(args_buf, len, seq);
        rpcagent_buffer_t out;
        uint64_t t0 = now_ns();
        rpcagent_status_t st = rpcagent_call_sync(agent, 1, fn, args_buf, len, RPCAGENT_TIMEOUT_DEFAULT, &out);
        lat[i] = now_ns() - t0;
        check_status(st, fn);
        check_reply(out.data, out.len, len, seq, fn);
        rpcagent_buffer_free(&out);
    }
    return lat_summary(lat, calls, now_ns() - start);
}

static struct lat_result raw_latency_round(size_t len, int calls, uint64_t *lat, uint64_t spin_ns) {
    raw.spin_ns = spin_ns;
    uint64_t start = now_ns();
    for (int i = 0; i < calls; i++) {
        uint64_t seq = g_seq++;
        mark(args_buf, len, seq);
        uint64_t hdr = len;
        struct iovec iov[2] = {{&hdr, 8}, {args_buf, len}};
        uint64_t t0 = now_ns();
        writev_full(raw.fd, iov, 2, "latency");
        size_t rlen;
        const uint8_t *p = raw_next(&raw, &rlen);
        lat[i] = now_ns() - t0;
        check_reply(p, rlen, len, seq, "raw latency");
    }
    raw.spin_ns = 0;
    return lat_summary(lat, calls, now_ns() - start);
}

#define RAW_SPIN_NS 50000 /* rpcagent's sync callers look for their reply for up to 50 us */

static void section_latency(void) {
    static const size_t sizes[] = {8, 1 * KiB, 64 * KiB};
    static const char *const size_names[] = {"8 B", "1 KiB", "64 KiB"};
    static const struct {
        const char *fn, *label;
    } handlers[] = {{"echo_set", "pool, reply_set"}, {"echo_alloc", "pool, reply_alloc+memcpy"}};
    enum { NH = sizeof handlers / sizeof handlers[0] };
    printf("\n## Sync round trips (rpcagent_call_sync, result freed with rpcagent_buffer_free)\n\n");
    printf("raw: blocking read; raw spin: the client looks for its reply with non-blocking reads and "
           "sched_yield for up to 50 us before a blocking read (what rpcagent's sync callers do)\n\n");
    printf("| size | handler | rpcagent p50 us | raw p50 us | raw/rpcagent | raw spin p50 us | raw spin/rpcagent | "
           "rpcagent calls/s | raw calls/s | rpcagent/raw | raw spin calls/s | rpcagent/raw spin |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    fflush(stdout);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t len = sizes[s];
        int calls = opt_quick ? 200 : (len >= 64 * KiB ? 1500 : 3000);
        uint64_t *lat = xmalloc(sizeof(uint64_t) * (size_t)calls);
        struct series rpc_p50[NH] = {0}, rpc_rate[NH] = {0}, raw_p50[2] = {0}, raw_rate[2] = {0};
        for (size_t h = 0; h < NH; h++) rpc_latency_round(handlers[h].fn, len, calls / 4, lat);
        for (int spin = 0; spin < 2; spin++) raw_latency_round(len, calls / 4, lat, spin ? RAW_SPIN_NS : 0);
        for (int r = 0; r < opt_rounds; r++) {
            for (size_t h = 0; h < NH; h++) {
                struct lat_result x = rpc_latency_round(handlers[h].fn, len, calls, lat);
                add(&rpc_p50[h], x.p50_us);
                add(&rpc_rate[h], x.calls_per_s);
            }
            for (int spin = 0; spin < 2; spin++) {
                struct lat_result x = raw_latency_round(len, calls, lat, spin ? RAW_SPIN_NS : 0);
                add(&raw_p50[spin], x.p50_us);
                add(&raw_rate[spin], x.calls_per_s);
            }
        }
        for (size_t h = 0; h < NH; h++) {
            char a[96], b[96], c[96], d[96], e[96], f[96];
            printf("| %s | %s | %s | %s | %.2fx | %s | %.2fx | %s | %s | %.2fx | %s | %.2fx |\n", size_names[s],
                   handlers[h].label, fmt_series(a, sizeof a, &rpc_p50[h], US),
                   fmt_series(b, sizeof b, &raw_p50[0], US), better_ratio(&rpc_p50[h], &raw_p50[0], US),
                   fmt_series(c, sizeof c, &raw_p50[1], US), better_ratio(&rpc_p50[h], &raw_p50[1], US),
                   fmt_series(d, sizeof d, &rpc_rate[h], RATE), fmt_series(e, sizeof e, &raw_rate[0], RATE),
                   better_ratio(&rpc_rate[h], &raw_rate[0], RATE), fmt_series(f, sizeof f, &raw_rate[1], RATE),
                   better_ratio(&rpc_rate[h], &raw_rate[1], RATE));
        }
        fflush(stdout);
        free(lat);
    }
}

/* ---------- section 2: calls in flight ---------- */

#define INFLIGHT_LEN 32

struct slot {
    rpcagent_future_t *f;
    uint64_t seq;
};

/* The function the in-flight rows call: the pool handler, unless a row
 * says otherwise. */
static const char *inflight_fn = "echo_set";

static void issue(struct slot *s, const char *what) {
    s->seq = g_seq++;
    mark(args_buf, INFLIGHT_LEN, s->seq);
    check_status(rpcagent_call_async(agent, 1, inflight_fn, args_buf, INFLIGHT_LEN, RPCAGENT_TIMEOUT_DEFAULT, &s->f),
                 what);
}

/* Reads a completed future's result, checks it, frees both. */
static void finish(struct slot *s, const char *what) {
    rpcagent_buffer_t out;
    rpcagent_status_t st = rpcagent_future_wait(s->f, 0, &out);
    if (st != RPCAGENT_OK)
        fail("%s: rpcagent_future_wait returned %s: %s", what, rpcagent_status_str(st),
             rpcagent_future_error(s->f) ? rpcagent_future_error(s->f) : rpcagent_last_error());
    check_reply(out.data, out.len, INFLIGHT_LEN, s->seq, what);
    rpcagent_buffer_free(&out);
    rpcagent_future_free(s->f);
    s->f = NULL;
}

/* (a) rpcagent_future_wait_any over the outstanding futures. */
static void run_wait_any(int n_inflight, int total) {
    rpcagent_future_t *futs[MAX_INFLIGHT];
    struct slot slots[MAX_INFLIGHT];
    int n = n_inflight < total ? n_inflight : total, issued = 0;
    for (int i = 0; i < n; i++, issued++) {
        issue(&slots[i], "wait_any: rpcagent_call_async");
        futs[i] = slots[i].f;
    }
    while (n > 0) {
        size_t idx = SIZE_MAX;
        check_status(rpcagent_future_wait_any(futs, (size_t)n, RPCAGENT_WAIT_FOREVER, &idx),
                     "rpcagent_future_wait_any");
        if (idx >= (size_t)n) fail("rpcagent_future_wait_any: index %zu of %d", idx, n);
        finish(&slots[idx], "wait_any");
        if (issued < total) {
            issue(&slots[idx], "wait_any: rpcagent_call_async");
            futs[idx] = slots[idx].f;
            issued++;
        } else {
            n--;
            slots[idx] = slots[n];
            futs[idx] = futs[n];
        }
    }
}

/* (b) rpcagent_future_wait on the oldest, in order. */
static void run_wait_oldest(int n_inflight, int total) {
    struct slot slots[MAX_INFLIGHT];
    int n = n_inflight < total ? n_inflight : total, issued = 0;
    for (int i = 0; i < n; i++, issued++) issue(&slots[i], "wait oldest: rpcagent_call_async");
    for (int done = 0, head = 0; done < total; done++, head = (head + 1) % n) {
        rpcagent_buffer_t out;
        rpcagent_status_t st = rpcagent_future_wait(slots[head].f, RPCAGENT_WAIT_FOREVER, &out);
        if (st != RPCAGENT_OK) fail("wait oldest: rpcagent_future_wait returned %s: %s", rpcagent_status_str(st),
                                    rpcagent_last_error());
        check_reply(out.data, out.len, INFLIGHT_LEN, slots[head].seq, "wait oldest");
        rpcagent_buffer_free(&out);
        rpcagent_future_free(slots[head].f);
        if (issued < total) {
            issue(&slots[head], "wait oldest: rpcagent_call_async");
            issued++;
        }
    }
}

/* (c) rpcagent_future_on_complete. The callback runs on a library thread
 * and must not block: it posts the slot's index to a lock-free ring
 * (multi-producer, single consumer) and wakes the main thread with a futex
 * only if it sleeps, once per sleep. The main thread reads the result and
 * issues the next call. The ring is static: a callback may still be
 * returning after its post was consumed. */
#define RING 256 /* > MAX_INFLIGHT: at most one post per slot is outstanding */
#define SLEEPS (1ull << 32)
static struct {
    _Atomic uint32_t tail;
    uint32_t head; /* the consumer's */
    _Atomic uint32_t cells[RING]; /* 0 empty, else slot index + 1 */
    _Atomic uint32_t seq;         /* bumped on every post; the futex word */
    /* 0, or SLEEPS | the value of seq the main thread sleeps on */
    _Atomic uint64_t sleeper;
} ring;

static void on_done(void *user_data) {
    uint32_t idx = (uint32_t)(uintptr_t)user_data;
    uint32_t pos = atomic_fetch_add(&ring.tail, 1);
    atomic_store(&ring.cells[pos % RING], idx + 1);
    uint32_t before = atomic_fetch_add(&ring.seq, 1);
    /* Callbacks may run on several library threads at once. The wake-up
     * belongs to the first post that bumped seq past the value the main
     * thread sleeps on (a post before that makes its wait return at once;
     * one after finds the wake-up taken): a batch of completions costs one
     * system call, not one per post. */
    uint64_t w = atomic_load(&ring.sleeper);
    if (w != 0 && (int32_t)(before - (uint32_t)w) >= 0 && atomic_compare_exchange_strong(&ring.sleeper, &w, 0))
        syscall(SYS_futex, (uint32_t *)&ring.seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static uint32_t ring_take(void) {
    for (;;) {
        uint32_t v = atomic_load(&ring.cells[ring.head % RING]);
        if (v != 0) {
            atomic_store(&ring.cells[ring.head % RING], 0);
            ring.head++;
            return v - 1;
        }
        uint32_t s = atomic_load(&ring.seq);
        atomic_store(&ring.sleeper, SLEEPS | s);
        if (atomic_load(&ring.cells[ring.head % RING]) == 0)
            syscall(SYS_futex, (uint32_t *)&ring.seq, FUTEX_WAIT_PRIVATE, s, NULL, NULL, 0);
        atomic_store(&ring.sleeper, 0);
    }
}

static void issue_cb(struct slot *slots, uint32_t i) {
    issue(&slots[i], "on_complete: rpcagent_call_async");
    check_status(rpcagent_future_on_complete(slots[i].f, on_done, (void *)(uintptr_t)i),
                 "rpcagent_future_on_complete");
}

static void run_on_complete(int n_inflight, int total) {
    struct slot slots[MAX_INFLIGHT];
    int n = n_inflight < total ? n_inflight : total, issued = 0;
    for (int i = 0; i < n; i++, issued++) issue_cb(slots, (uint32_t)i);
    for (int done = 0; done < total; done++) {
        uint32_t i = ring_take();
        if (i >= (uint32_t)n || slots[i].f == NULL) fail("on_complete: bogus completion of slot %u", i);
        finish(&slots[i], "on_complete");
        if (issued < total) {
            issue_cb(slots, i);
            issued++;
        }
    }
}

/* (d) a completion queue: each call posts its slot index; the main thread
 * takes tags with rpcagent_queue_wait, reads the result and issues the
 * replacement into that slot. */
static void issue_queued(struct slot *slots, uint32_t i, rpcagent_queue_t *q) {
    issue(&slots[i], "queue: rpcagent_call_async");
    check_status(rpcagent_future_notify(slots[i].f, q, i), "rpcagent_future_notify");
}

static void run_queue(int n_inflight, int total) {
    struct slot slots[MAX_INFLIGHT];
    rpcagent_queue_t *q = NULL;
    check_status(rpcagent_queue_new(&q), "rpcagent_queue_new");
    int n = n_inflight < total ? n_inflight : total, issued = 0;
    for (int i = 0; i < n; i++, issued++) issue_queued(slots, (uint32_t)i, q);
    for (int done = 0; done < total; done++) {
        uint64_t tag = UINT64_MAX;
        check_status(rpcagent_queue_wait(q, RPCAGENT_WAIT_FOREVER, &tag), "rpcagent_queue_wait");
        if (tag >= (uint64_t)n || slots[tag].f == NULL) fail("queue: bogus tag %llu", (unsigned long long)tag);
        finish(&slots[tag], "queue");
        if (issued < total) {
            issue_queued(slots, (uint32_t)tag, q);
            issued++;
        }
    }
    rpcagent_queue_free(q);
}

/* The rpcagent variants of the in-flight rows. Each keeps `n_inflight`
 * calls of INFLIGHT_LEN bytes to `inflight_fn` outstanding until `total`
 * completed, checking each reply. */
struct inflight_mode {
    const char *name;
    void (*run)(int n_inflight, int total);
};
static const struct inflight_mode inflight_modes[] = {
    {"future_wait_any", run_wait_any},
    {"future_wait, oldest first", run_wait_oldest},
    {"future_on_complete", run_on_complete},
    {"queue_wait", run_queue},
};
enum { N_MODES = sizeof inflight_modes / sizeof inflight_modes[0] };

/* The raw equivalent: one connection, N requests outstanding. The first N
 * go out with one write; then, `batched` 0: for each reply read, one new
 * request written (one write per request, as each rpcagent call is issued
 * on its own); `batched` 1: every complete reply in the read buffer is
 * taken and as many new requests go out with one write. */
static void raw_inflight(int n_inflight, int total, int batched) {
    enum { MSG = 8 + INFLIGHT_LEN };
    static uint8_t out[MAX_INFLIGHT * MSG];
    uint64_t next_send = g_seq, next_recv = g_seq;
    g_seq += (uint64_t)total;
    uint64_t end = next_send + (uint64_t)total;
    int k = n_inflight < total ? n_inflight : total;
    for (;;) {
        /* Write k new requests with one write. */
        for (int i = 0; i < k; i++) {
            uint8_t *m = out + (size_t)i * MSG;
            uint64_t len = INFLIGHT_LEN;
            memcpy(m, &len, 8);
            memset(m + 8, 0x33, INFLIGHT_LEN);
            mark(m + 8, INFLIGHT_LEN, next_send++);
        }
        if (k > 0) {
            struct iovec iov = {out, (size_t)k * MSG};
            writev_full(raw.fd, &iov, 1, "in flight");
        }
        if (next_recv == end) break;
        /* Take one reply (reading if needed); batched: then every complete one buffered. */
        int got = 0;
        do {
            size_t rlen;
            const uint8_t *p = raw_next(&raw, &rlen);
            check_reply(p, rlen, INFLIGHT_LEN, next_recv++, "raw in flight");
            got++;
        } while (batched && next_recv < end && raw_buffered(&raw));
        uint64_t left = end - next_send;
        k = (uint64_t)got < left ? got : (int)left;
    }
}
static void raw_inflight_each(int n_inflight, int total) { raw_inflight(n_inflight, total, 0); }
static void raw_inflight_batched(int n_inflight, int total) { raw_inflight(n_inflight, total, 1); }

static int variant_wanted(int m) { return opt_variant == NULL || strstr(inflight_modes[m].name, opt_variant) != NULL; }

static double timed_rate(void (*run)(int, int), int n_inflight, int total) {
    uint64_t t0 = now_ns();
    run(n_inflight, total);
    return total / ((now_ns() - t0) / 1e9);
}

static void section_inflight(void) {
    static const int depths[] = {1, 16, 128};
    printf("\n## Calls in flight (32 B echo, pool handler, rpcagent_call_async)\n\n");
    printf("| in flight | rpcagent variant | rpcagent calls/s | raw calls/s, write per request | rpcagent/raw | "
           "raw calls/s, batched writes | rpcagent/raw batched |\n");
    printf("|---|---|---|---|---|---|---|\n");
    fflush(stdout);
    for (size_t d = 0; d < sizeof depths / sizeof depths[0]; d++) {
        int n = depths[d];
        if (opt_depth > 0 && n != opt_depth) continue;
        int total = opt_quick ? 2000 : (n == 1 ? 20000 : n == 16 ? 50000 : 100000);
        struct series rpc[N_MODES] = {0}, raw_each = {0}, raw_batched = {0};
        for (int m = 0; m < N_MODES; m++)
            if (variant_wanted(m)) inflight_modes[m].run(n, total / 4);
        raw_inflight_each(n, total / 4);
        raw_inflight_batched(n, total / 4);
        for (int r = 0; r < opt_rounds; r++) {
            for (int m = 0; m < N_MODES; m++)
                if (variant_wanted(m)) add(&rpc[m], timed_rate(inflight_modes[m].run, n, total));
            add(&raw_each, timed_rate(raw_inflight_each, n, total));
            add(&raw_batched, timed_rate(raw_inflight_batched, n, total));
        }
        for (int m = 0; m < N_MODES; m++) {
            if (!variant_wanted(m)) continue;
            char a[96], b[96], c[96];
            printf("| %d | %s | %s | %s | %.2fx | %s | %.2fx |\n", n, inflight_modes[m].name,
                   fmt_series(a, sizeof a, &rpc[m], RATE), fmt_series(b, sizeof b, &raw_each, RATE),
                   better_ratio(&rpc[m], &raw_each, RATE), fmt_series(c, sizeof c, &raw_batched, RATE),
                   better_ratio(&rpc[m], &raw_batched, RATE));
        }
        fflush(stdout);
    }
}

/* ---------- section 3: large payloads ---------- */

static double rpc_bandwidth_round(size_t len, int iters) {
    uint64_t t0 = now_ns();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = g_seq++;
        mark(args_buf, len, seq);
        rpcagent_buffer_t out;
        check_status(rpcagent_call_sync(agent, 1, "echo_alloc", args_buf, len, RPCAGENT_TIMEOUT_DEFAULT, &out),
                     "echo_alloc (large)");
        check_reply(out.data, out.len, len, seq, "echo_alloc (large)");
        rpcagent_buffer_free(&out);
    }
    return 2.0 * (double)len * iters / ((now_ns() - t0) / 1e9) / 1e9;
}

static double raw_bandwidth_round(size_t len, int iters) {
    if (raw.pos != raw.have) fail("raw client: stray bytes before a large echo");
    uint64_t t0 = now_ns();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = g_seq++;
        mark(args_buf, len, seq);
        uint64_t hdr = len;
        struct iovec iov[2] = {{&hdr, 8}, {args_buf, len}};
        writev_full(raw.fd, iov, 2, "large");
        read_full(raw.fd, (uint8_t *)&hdr, 8, "large");
        if (hdr != len) fail("raw large: reply of %llu bytes (want %zu)", (unsigned long long)hdr, len);
        read_full(raw.fd, raw_big, len, "large");
        check_reply(raw_big, len, len, seq, "raw large");
    }
    return 2.0 * (double)len * iters / ((now_ns() - t0) / 1e9) / 1e9;
}

/* The zero-copy forms: an 8-byte header and the tensor as two parts
 * (rpcagent_call_async_iov, no concatenating copy), answered by a server
 * replying with its weights in place (rpcagent_reply_set_owned). */
static double rpc_iov_round(size_t len, int iters) {
    uint64_t t0 = now_ns();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = g_seq++;
        rpcagent_iovec_t parts[2] = {{(const uint8_t *)&seq, 8}, {args_buf + 8, len - 8}};
        rpcagent_future_t *f;
        check_status(rpcagent_call_async_iov(agent, 1, "weights", parts, 2, RPCAGENT_TIMEOUT_DEFAULT, NULL, NULL, &f),
                     "weights (iov)");
        rpcagent_buffer_t out;
        check_status(rpcagent_future_wait(f, -1, &out), "weights (wait)");
        if (out.len != len || out.data[0] != WEIGHT_BYTE || out.data[len - 1] != WEIGHT_BYTE)
            fail("weights: reply of %zu bytes, expected %zu of 0x%x", out.len, len, WEIGHT_BYTE);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(f);
    }
    return 2.0 * (double)len * iters / ((now_ns() - t0) / 1e9) / 1e9;
}

static const size_t bw_sizes_full[] = {1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB};
static const size_t bw_sizes_quick[] = {1 * MiB};

static void section_bandwidth(void) {
    const size_t *sizes = opt_quick ? bw_sizes_quick : bw_sizes_full;
    size_t n_sizes = opt_quick ? 1 : sizeof bw_sizes_full / sizeof bw_sizes_full[0];
    printf("\n## Large round trips (GB/s = 2 x size / time)\n\n");
    printf("Copying forms: rpcagent_call_sync, the handler fills rpcagent_reply_alloc with memcpy, the result is "
           "released with rpcagent_buffer_free. Zero-copy forms: rpcagent_call_async_iov (8-byte header + "
           "tensor as two parts), the handler answers with its weights through rpcagent_reply_set_owned.\n\n");
    printf("| size | rpcagent GB/s, copying forms | rpcagent GB/s, zero-copy forms | raw GB/s | copying/raw | "
           "zero-copy/raw |\n");
    printf("|---|---|---|---|---|---|\n");
    fflush(stdout);
    for (size_t s = 0; s < n_sizes; s++) {
        size_t len = sizes[s];
        int iters = opt_quick ? 20 : len <= MiB ? 200 : len <= 16 * MiB ? 20 : len <= 64 * MiB ? 8 : 3;
        int warm = iters / 4 > 0 ? iters / 4 : 1;
        struct series rpc = {0}, iov = {0}, rawr = {0};
        rpc_bandwidth_round(len, warm);
        rpc_iov_round(len, warm);
        raw_bandwidth_round(len, warm);
        for (int r = 0; r < opt_rounds; r++) {
            add(&rpc, rpc_bandwidth_round(len, iters));
            add(&iov, rpc_iov_round(len, iters));
            add(&rawr, raw_bandwidth_round(len, iters));
        }
        char a[96], b[96], c[96];
        printf("| %zu MiB | %s | %s | %s | %.2fx | %.2fx |\n", len / MiB, fmt_series(a, sizeof a, &rpc, GBPS),
               fmt_series(b, sizeof b, &iov, GBPS), fmt_series(c, sizeof c, &rawr, GBPS),
               better_ratio(&rpc, &rawr, GBPS), better_ratio(&iov, &rawr, GBPS));
        fflush(stdout);
    }
}

/* ---------- section 4: ranks on one host, shared memory vs the TCP path ---------- */

static double memcpy_round(uint8_t *dst, const uint8_t *src, size_t len, int iters) {
    uint64_t t0 = now_ns();
    for (int i = 0; i < iters; i++) {
        memcpy(dst, src, len);
        __asm__ volatile("" ::"r"(dst) : "memory"); /* the copy is not optimised away */
    }
    return (double)len * iters / ((now_ns() - t0) / 1e9) / 1e9;
}

/* One row: the shared-memory world, the TCP-path world and a baseline,
 * median [min-max] each, with ratios oriented so that > 1 means shared
 * memory did better. */
static void samehost_row(const char *label, const struct series *shm, const struct series *tcp,
                         const struct series *base, const char *base_name, enum unit u) {
    char a[96], b[96], c[96];
    printf("| %s | %s | %s | %.2fx | %s: %s | %.2fx |\n", label, fmt_series(a, sizeof a, shm, u),
           fmt_series(b, sizeof b, tcp, u), better_ratio(shm, tcp, u), base_name, fmt_series(c, sizeof c, base, u),
           better_ratio(shm, base, u));
}

static void section_samehost(void) {
    printf("\n## Ranks on one host: shared memory (RPCAGENT_TRANSPORT=auto, the default) vs the TCP path "
           "(=tcp), same run\n\n");
    printf("Two worlds of 2 (this process and a forked server each), one per setting; the raw baseline is "
           "the TCP echo above, with its 50 us spinning client for latency.\n\n");
    printf("| row | shm | tcp path | shm vs tcp path | baseline | shm vs baseline |\n");
    printf("|---|---|---|---|---|---|\n");
    fflush(stdout);
    int calls = opt_quick ? 400 : 5000;
    uint64_t *lat = xmalloc(sizeof(uint64_t) * (size_t)calls);
    static const struct {
        const char *fn, *label;
    } lat_rows[] = {{"echo_set", "8 B p50 us, pool handler"}, {"echo_inline", "8 B p50 us, inline handler"}};
    for (size_t row = 0; row < 2; row++) {
        struct series p50[2] = {0}, raw_p50 = {0};
        for (int w = 0; w < 2; w++) {
            agent = agents[w];
            rpc_latency_round(lat_rows[row].fn, 8, calls / 4, lat);
        }
        raw_latency_round(8, calls / 4, lat, RAW_SPIN_NS);
        for (int r = 0; r < opt_rounds; r++) {
            for (int w = 0; w < 2; w++) {
                agent = agents[w];
                add(&p50[w], rpc_latency_round(lat_rows[row].fn, 8, calls, lat).p50_us);
            }
            add(&raw_p50, raw_latency_round(8, calls, lat, RAW_SPIN_NS).p50_us);
        }
        samehost_row(lat_rows[row].label, &p50[1], &p50[0], &raw_p50, "raw TCP, spin", US);
        fflush(stdout);
    }
    free(lat);
    static const struct {
        int mode;
        const char *fn, *label;
    } deep_rows[] = {{3, "echo_set", "128 x 32 B in flight, queue_wait, pool handler, calls/s"},
                     {0, "echo_set", "128 x 32 B in flight, wait_any, pool handler, calls/s"},
                     {3, "echo_inline", "128 x 32 B in flight, queue_wait, inline handler, calls/s"},
                     {0, "echo_inline", "128 x 32 B in flight, wait_any, inline handler, calls/s"}};
    int total = opt_quick ? 4000 : 200000;
    for (size_t row = 0; row < sizeof deep_rows / sizeof deep_rows[0]; row++) {
        inflight_fn = deep_rows[row].fn;
        struct series rate[2] = {0}, raw_rate = {0};
        for (int w = 0; w < 2; w++) {
            agent = agents[w];
            inflight_modes[deep_rows[row].mode].run(128, total / 4);
        }
        raw_inflight_batched(128, total / 4);
        for (int r = 0; r < opt_rounds; r++) {
            for (int w = 0; w < 2; w++) {
                agent = agents[w];
                add(&rate[w], timed_rate(inflight_modes[deep_rows[row].mode].run, 128, total));
            }
            add(&raw_rate, timed_rate(raw_inflight_batched, 128, total));
        }
        samehost_row(deep_rows[row].label, &rate[1], &rate[0], &raw_rate, "raw TCP, batched writes", RATE);
        fflush(stdout);
    }
    inflight_fn = "echo_set";
    if (big_cap >= (opt_quick ? MiB : 64 * MiB)) {
        size_t len = opt_quick ? MiB : 64 * MiB;
        int iters = opt_quick ? 20 : 8;
        uint8_t *copy = big_alloc(len, 0);
        struct series bw[2] = {0}, zc[2] = {0}, raw_bw = {0}, cp = {0};
        for (int w = 0; w < 2; w++) {
            agent = agents[w];
            rpc_bandwidth_round(len, 2);
            rpc_iov_round(len, 2);
        }
        raw_bandwidth_round(len, 2);
        memcpy_round(copy, args_buf, len, 2);
        for (int r = 0; r < opt_rounds; r++) {
            for (int w = 0; w < 2; w++) {
                agent = agents[w];
                add(&bw[w], rpc_bandwidth_round(len, iters));
                add(&zc[w], rpc_iov_round(len, iters));
            }
            add(&raw_bw, raw_bandwidth_round(len, iters));
            add(&cp, memcpy_round(copy, args_buf, len, iters));
        }
        char label[96];
        snprintf(label, sizeof label, "%zu MiB round trip, GB/s", len / MiB);
        samehost_row(label, &bw[1], &bw[0], &raw_bw, "raw TCP", GBPS);
        samehost_row(label, &bw[1], &bw[0], &cp, "memcpy of the size, one thread", GBPS);
        snprintf(label, sizeof label, "%zu MiB round trip, zero-copy forms, GB/s", len / MiB);
        samehost_row(label, &zc[1], &zc[0], &raw_bw, "raw TCP", GBPS);
        samehost_row(label, &zc[1], &zc[0], &cp, "memcpy of the size, one thread", GBPS);
        free(copy);
        fflush(stdout);
    }
    agent = agents[0];
}

/* ---------- section 5: cancellation ---------- */

static int cancelled_on_purpose[2]; /* per world: calls this run cancelled */

/* When the server's handler last saw a cancel; `started`: how many it
 * has started. */
static uint64_t server_noticed_at(uint64_t *started) {
    rpcagent_buffer_t out;
    check_status(rpcagent_call_sync(agent, 1, "noticed_at", NULL, 0, RPCAGENT_TIMEOUT_DEFAULT, &out), "noticed_at");
    uint64_t t[2];
    if (out.len != sizeof t) fail("noticed_at: %zu bytes", out.len);
    memcpy(t, out.data, sizeof t);
    rpcagent_buffer_free(&out);
    if (started) *started = t[1];
    return t[0];
}

/* One cancel of a running handler: how long after rpcagent_future_cancel
 * the caller's wait returned CANCELLED, and the handler saw it (us). */
static void cancel_once(int w, double *returned_us, double *noticed_us) {
    uint64_t started, now_started;
    uint64_t before = server_noticed_at(&started);
    rpcagent_future_t *f;
    check_status(rpcagent_call_async(agent, 1, "until_cancelled", NULL, 0, RPCAGENT_TIMEOUT_DEFAULT, &f),
                 "until_cancelled");
    /* Cancelled once it runs (not before: that is dropped unrun). */
    uint64_t wait_until = now_ns() + 5000000000ull;
    do {
        usleep(1000);
        if (now_ns() > wait_until) fail("until_cancelled never started");
        server_noticed_at(&now_started);
    } while (now_started == started);
    uint64_t t0 = now_ns();
    check_status(rpcagent_future_cancel(f), "rpcagent_future_cancel");
    rpcagent_buffer_t out;
    if (rpcagent_future_wait(f, -1, &out) != RPCAGENT_ERR_CANCELLED) fail("a cancelled call did not end CANCELLED");
    *returned_us = (now_ns() - t0) / 1e3;
    rpcagent_future_free(f);
    cancelled_on_purpose[w]++;
    /* Asked only after a pause: a caller polling meanwhile would hold a
     * CPU the server's I/O thread needs (2 CPUs, one of them the handler's). */
    uint64_t seen;
    uint64_t give_up = now_ns() + 5000000000ull;
    do {
        usleep(5000);
        if (now_ns() > give_up) fail("the handler never saw its cancel");
    } while ((seen = server_noticed_at(NULL)) == before);
    *noticed_us = (seen - t0) / 1e3;
}

static void section_cancel(void) {
    printf("\n## Cancellation: a running pool handler polling rpcagent_reply_cancelled every %d us\n\n",
           CANCEL_POLL_US);
    printf("Per round: 20 cancels, medians; the worker is free once the handler returns, which it does as it "
           "sees the cancel. Round trips: 8 B p50 of the same world, pool handler, back to back (hot: both sides "
           "spinning), and each after 2 ms idle (as a cancel comes: the destination's I/O thread asleep).\n\n");
    printf("| world | cancel -> wait returns CANCELLED, us | cancel -> handler sees it, us | 8 B round trip p50, "
           "hot, us | 8 B round trip p50 after 2 ms idle, us |\n");
    printf("|---|---|---|---|---|\n");
    static const char *names[2] = {"tcp", "auto (shm)"};
    uint64_t lat[200];
    for (int w = 0; w < 2; w++) {
        agent = agents[w];
        struct series ret = {0}, seen = {0}, rtt = {0}, cold = {0};
        int per_round = opt_quick ? 3 : 20;
        for (int r = 0; r < opt_rounds; r++) {
            double a[20], b[20];
            struct series ra = {0}, rb = {0};
            for (int i = 0; i < per_round; i++) {
                cancel_once(w, &a[i], &b[i]);
                add(&ra, a[i]);
                add(&rb, b[i]);
            }
            add(&ret, median(&ra));
            add(&seen, median(&rb));
            add(&rtt, rpc_latency_round("echo_set", 8, 200, lat).p50_us);
            int idle_calls = opt_quick ? 5 : 50;
            for (int i = 0; i < idle_calls; i++) {
                usleep(2000);
                lat[i] = (uint64_t)(rpc_latency_round("echo_set", 8, 1, lat + 100).p50_us * 1000);
            }
            add(&cold, lat_summary(lat, idle_calls, 1).p50_us);
        }
        char x[96], y[96], z[96], c[96];
        printf("| %s | %s | %s | %s | %s |\n", names[w], fmt_series(x, sizeof x, &ret, US),
               fmt_series(y, sizeof y, &seen, US), fmt_series(z, sizeof z, &rtt, US), fmt_series(c, sizeof c, &cold, US));
        fflush(stdout);
    }
    agent = agents[0];
}

/* ---------- main ---------- */

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s [--quick] [--rounds N] [--only latency,inflight,bandwidth,samehost,cancel] [--one-cpu] [--depth 1|16|128] [--variant NAME]\n",
            argv0);
    exit(2);
}

static void parse_only(const char *list, const char *argv0) {
    want_latency = want_inflight = want_bandwidth = want_samehost = want_cancel = 0;
    char *copy = strdup(list), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t != NULL; t = strtok_r(NULL, ",", &save)) {
        if (strcmp(t, "latency") == 0) want_latency = 1;
        else if (strcmp(t, "inflight") == 0) want_inflight = 1;
        else if (strcmp(t, "bandwidth") == 0) want_bandwidth = 1;
        else if (strcmp(t, "samehost") == 0) want_samehost = 1;
        else if (strcmp(t, "cancel") == 0) want_cancel = 1;
        else {
            fprintf(stderr, "unknown section '%s' (latency, inflight, bandwidth, samehost, cancel)\n", t);
            usage(argv0);
        }
    }
    free(copy);
}

int main(int argc, char **argv) {
    int rounds_given = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) opt_quick = 1;
        else if (strcmp(argv[i], "--one-cpu") == 0) opt_one_cpu = 1;
        else if (strcmp(argv[i], "--depth") == 0 && i + 1 < argc) opt_depth = atoi(argv[++i]);
        else if (strcmp(argv[i], "--variant") == 0 && i + 1 < argc) opt_variant = argv[++i];
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
            opt_rounds = atoi(argv[++i]);
            rounds_given = 1;
            if (opt_rounds < 1 || opt_rounds > MAX_ROUNDS) {
                fprintf(stderr, "--rounds must be 1..%d\n", MAX_ROUNDS);
                return 2;
            }
        } else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) parse_only(argv[++i], argv[0]);
        else usage(argv[0]);
    }
    if (opt_quick && !rounds_given) opt_rounds = 2;
    signal(SIGPIPE, SIG_IGN);
    if (opt_one_cpu) { /* inherited by the servers and every thread */
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(0, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) fail("sched_setaffinity: %s", strerror(errno));
    }

    char date[64];
    time_t t = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S %Z", localtime(&t));
    struct utsname un;
    uname(&un);
    printf("# rpcbench_c: rpcagent through its C ABI vs a raw TCP echo, same run\n\n");
    printf("date %s, host %s, nproc %ld, rpcagent %s, loopback, %s; %d rounds%s, cells: median [min-max] over "
           "rounds\n",
           date, un.nodename, sysconf(_SC_NPROCESSORS_ONLN), rpcagent_version(),
           opt_one_cpu ? "all processes on CPU 0" : "threads on any CPU", opt_rounds, opt_quick ? " (--quick)" : "");
    printf("ratio columns: > 1 means rpcagent did better (latency: raw p50 / rpcagent p50; rates: rpcagent / raw)\n");
    fflush(stdout);

    big_cap = want_bandwidth ? (opt_quick ? bw_sizes_quick[0] : bw_sizes_full[3])
                             : want_samehost ? (opt_quick ? MiB : 64 * MiB) : 0;
    size_t args_cap = big_cap > 64 * KiB ? big_cap : 64 * KiB;

    /* Fork the three servers before this process starts any library thread. */
    int raw_port = start_raw_server(big_cap);
    int master_ports[2];
    for (int w = 0; w < 2; w++) {
        master_ports[w] = free_port(w > 0 ? master_ports[0] : 0);
        start_rpc_server(w, master_ports[w]);
    }

    args_buf = big_alloc(args_cap, 0x5c);
    if (big_cap) raw_big = big_alloc(big_cap, 0);
    raw.fd = raw_connect(raw_port);
    raw.rbuf = xmalloc(RAW_RBUF);
    memset(raw.rbuf, 0, RAW_RBUF);

    for (int w = 0; w < 2; w++) {
        agents[w] = join_world(0, master_ports[w], world_transport[w]);
        check_status(rpcagent_start(agents[w]), "rpcagent_start");
        check_status(rpcagent_barrier(agents[w], 30000), "rpcagent_barrier");
    }
    agent = agents[0];

    uint64_t t0 = now_ns();
    if (want_latency) section_latency();
    if (want_inflight) section_inflight();
    if (want_bandwidth) section_bandwidth();
    if (want_samehost) section_samehost();
    if (want_cancel) section_cancel();

    unsigned long long calls = 0;
    for (int w = 0; w < 2; w++) {
        rpcagent_stats_t st;
        check_status(rpcagent_get_stats(agents[w], &st, sizeof st), "rpcagent_get_stats");
        /* The only failures are the cancels of section 5. */
        if (st.calls_failed != (uint64_t)cancelled_on_purpose[w] || st.calls_timed_out || st.calls_in_flight ||
            st.calls_ok + st.calls_failed != st.calls_started)
            fail("stats: %llu started, %llu ok, %llu failed, %llu timed out, %llu in flight",
                 (unsigned long long)st.calls_started, (unsigned long long)st.calls_ok,
                 (unsigned long long)st.calls_failed, (unsigned long long)st.calls_timed_out,
                 (unsigned long long)st.calls_in_flight);
        calls += st.calls_started;
    }
    const char *shm_way = rpcagent_peer_transport(agents[1], 1);

    /* Stop: each server leaves on "stop"; all shut down gracefully. */
    for (int w = 0; w < 2; w++) {
        rpcagent_buffer_t out;
        check_status(rpcagent_call_sync(agents[w], 1, "stop", NULL, 0, RPCAGENT_TIMEOUT_DEFAULT, &out), "stop");
        rpcagent_buffer_free(&out);
        check_status(rpcagent_shutdown(agents[w], 1, 30000), "rpcagent_shutdown (client)");
        rpcagent_free(agents[w]);
    }
    close(raw.fd);

    int failed = 0;
    pid_t pids[3] = {rpc_server_pids[0], rpc_server_pids[1], raw_server_pid};
    const char *names[3] = {"rpcagent server (tcp)", "rpcagent server (auto)", "raw server"};
    for (int i = 0; i < 3; i++) {
        int status = 0;
        if (waitpid(pids[i], &status, 0) != pids[i] || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "rpcbench_c: FAILED: the %s exited with status %d\n", names[i], status);
            failed = 1;
        }
    }
    rpc_server_pids[0] = rpc_server_pids[1] = raw_server_pid = 0;
    free(args_buf);
    free(raw_big);
    free(raw.rbuf);
    printf("\n%llu rpcagent calls, all replies checked; the `auto` world's calls went over %s; %.0f s\n", calls,
           shm_way ? shm_way : "nothing", (now_ns() - t0) / 1e9);
    return failed;
}
