/* Cancellation through the C ABI, in processes (a world of 2: rank 0
 * calls, rank 1 serves; each rank has one worker thread besides its I/O
 * thread). Run over shared memory and, in the suite's second run, over TCP.
 * - a looping handler notices rpcagent_reply_cancelled within a bounded
 *   time of the caller's rpcagent_future_cancel; the caller's wait returns
 *   RPCAGENT_ERR_CANCELLED at once;
 * - a request queued behind a busy worker is cancelled and never runs;
 * - a deferred reply notices rpcagent_deferred_cancelled, and completing it
 *   anyway returns RPCAGENT_OK; so does one an inline handler deferred;
 * - a cancel from another thread ends a wait in progress (bounded time);
 * - a deadline that passes cancels a running handler the same way;
 * - a rank's cancel of a call to itself reaches its own handler;
 * - cancel after completion changes nothing (the reply is still there);
 * - a cancel racing the reply, 10,000 times (1,200 under memcheck,
 *   RPCAGENT_TEST_SMALL): every call ends OK (with the
 *   right bytes) or CANCELLED, its queue tag comes exactly once and its
 *   callback runs exactly once;
 * - a request waiting for its destination's rpcagent_start, cancelled,
 *   never runs;
 * - NULL handles: cancel is INVALID_ARGUMENT, the predicates are 0;
 * - rpcagent_get_function_stats on the serving rank counts all of the
 *   above: served, failed, cancelled (dropped unrun or answer dropped),
 *   running, bytes in, handler times. */
#include "harness.h"

#include <pthread.h>
#include <stdatomic.h>

/* What this process's handlers saw, read by the caller through the inline
 * "count" function (inline: it answers even while the worker is busy). */
static atomic_int loops_started, loops_noticed, marks_ran, defers_started, defers_noticed, defer_complete_ok,
    overran;

static int32_t looping(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    atomic_fetch_add(&loops_started, 1);
    double give_up = now_ms() + 20000;
    while (!rpcagent_reply_cancelled(reply)) {
        if (now_ms() > give_up) {
            atomic_fetch_add(&overran, 1);
            break;
        }
        usleep(200);
    }
    atomic_fetch_add(&loops_noticed, 1);
    return rpcagent_reply_set(reply, (const uint8_t *)"late", 4);
}

static int32_t mark(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    (void)reply;
    atomic_fetch_add(&marks_ran, 1);
    return 0;
}

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static void *watch_deferred(void *arg) {
    rpcagent_deferred_t *d = arg;
    double give_up = now_ms() + 20000;
    while (!rpcagent_deferred_cancelled(d)) {
        if (now_ms() > give_up) {
            atomic_fetch_add(&overran, 1);
            break;
        }
        usleep(200);
    }
    atomic_fetch_add(&defers_noticed, 1);
    if (rpcagent_deferred_complete(d, (const uint8_t *)"x", 1) == RPCAGENT_OK) atomic_fetch_add(&defer_complete_ok, 1);
    return NULL;
}

static int32_t deferring(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
    if (d == NULL) return 1;
    atomic_fetch_add(&defers_started, 1);
    pthread_t t;
    if (pthread_create(&t, NULL, watch_deferred, d) != 0) return 1;
    pthread_detach(t);
    return 0;
}

struct counts {
    int loops_started, loops_noticed, marks_ran, defers_started, defers_noticed, defer_complete_ok, overran;
};

static struct counts mine(void) {
    struct counts c = {atomic_load(&loops_started),  atomic_load(&loops_noticed),  atomic_load(&marks_ran),
                       atomic_load(&defers_started), atomic_load(&defers_noticed), atomic_load(&defer_complete_ok),
                       atomic_load(&overran)};
    return c;
}

static int32_t count(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    struct counts c = mine();
    return rpcagent_reply_set(reply, (const uint8_t *)&c, sizeof c);
}

static struct counts theirs(rpcagent_t *agent) {
    rpcagent_buffer_t out;
    CHECK_OK(rpcagent_call_sync(agent, 1, "count", NULL, 0, 10000, &out));
    CHECK(out.len == sizeof(struct counts));
    struct counts c;
    memcpy(&c, out.data, sizeof c);
    rpcagent_buffer_free(&out);
    return c;
}

/* Polls rank 1's counts until `field` (an offset into them) reaches
 * `want`, at most 10 s; returns the milliseconds it took. */
#define AWAIT_THEIRS(agent, field, want)                                                           \
    do {                                                                                           \
        double until_ = now_ms() + 10000;                                                          \
        while (theirs(agent).field < (want)) {                                                     \
            if (now_ms() > until_) {                                                               \
                fprintf(stderr, "%s:%d: rank 1's " #field " never reached %d\n", __FILE__, __LINE__, \
                        (int)(want));                                                              \
                exit(1);                                                                           \
            }                                                                                      \
            usleep(1000);                                                                          \
        }                                                                                          \
    } while (0)

static rpcagent_status_t wait_status(rpcagent_future_t *f, int64_t timeout_ms) {
    rpcagent_buffer_t out;
    rpcagent_status_t s = rpcagent_future_wait(f, timeout_ms, &out);
    rpcagent_buffer_free(&out);
    return s;
}

struct pending_cancel {
    rpcagent_future_t *f;
    int delay_ms;
};

static void *cancel_later(void *arg) {
    struct pending_cancel *p = arg;
    usleep((useconds_t)p->delay_ms * 1000);
    CHECK_OK(rpcagent_future_cancel(p->f));
    return NULL;
}

/* How many calls race their cancels. */
static int race_calls(void) { return getenv("RPCAGENT_TEST_SMALL") ? 1200 : 10000; }

static atomic_int callbacks;
static void on_done(void *u) {
    (void)u;
    atomic_fetch_add(&callbacks, 1);
}

static void race(rpcagent_t *agent) {
    rpcagent_queue_t *q;
    CHECK_OK(rpcagent_queue_new(&q));
    int ok = 0, cancelled = 0, calls = race_calls();
    for (int i = 0; i < calls; i++) {
        uint64_t v = (uint64_t)i * 2654435761u;
        rpcagent_future_t *f;
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)&v, sizeof v, 10000, &f));
        CHECK_OK(rpcagent_future_notify(f, q, (uint64_t)i));
        CHECK_OK(rpcagent_future_on_complete(f, on_done, NULL));
        /* Cancel at varying points: at once, or after a few looks. */
        for (int spin = 0; spin < i % 16 && !rpcagent_future_is_ready(f); spin++) usleep(i % 3);
        CHECK_OK(rpcagent_future_cancel(f));
        rpcagent_buffer_t out;
        rpcagent_status_t s = rpcagent_future_wait(f, -1, &out);
        if (s == RPCAGENT_OK) {
            CHECK(out.len == sizeof v && memcmp(out.data, &v, sizeof v) == 0);
            ok++;
        } else {
            CHECK_STATUS(s, RPCAGENT_ERR_CANCELLED);
            cancelled++;
        }
        rpcagent_buffer_free(&out);
        /* A second cancel changes nothing. */
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_STATUS(wait_status(f, 0), s);
        uint64_t tag = 99999;
        CHECK_OK(rpcagent_queue_wait(q, 1000, &tag));
        CHECK(tag == (uint64_t)i);
        CHECK_STATUS(rpcagent_queue_wait(q, 0, &tag), RPCAGENT_PENDING);
        rpcagent_future_free(f);
    }
    double until = now_ms() + 10000;
    while (atomic_load(&callbacks) < calls && now_ms() < until) usleep(1000);
    usleep(20000);
    CHECK(atomic_load(&callbacks) == calls);
    printf("[cancel] race: %d of %d calls completed OK, %d cancelled; every tag and callback once\n", ok, calls,
           cancelled);
    rpcagent_queue_free(q);
}

static rpcagent_function_stats_t fstats(rpcagent_t *agent, const char *name) {
    rpcagent_function_stats_t s;
    memset(&s, 0xff, sizeof s);
    CHECK_OK(rpcagent_get_function_stats(agent, name, &s, sizeof s));
    return s;
}

/* What rank 1 served, as rank 0's calls above make it. */
static void check_function_stats(rpcagent_t *agent) {
    /* The race's last requests may still be on their way through the pool. */
    double until = now_ms() + 10000;
    rpcagent_function_stats_t echo_s = fstats(agent, "echo");
    uint64_t echoes = (uint64_t)race_calls() + 2;
    while (echo_s.served + echo_s.cancelled < echoes && now_ms() < until) {
        usleep(1000);
        echo_s = fstats(agent, "echo");
    }
    CHECK(echo_s.served + echo_s.cancelled == echoes && echo_s.failed == 0 && echo_s.running == 0);
    CHECK(echo_s.bytes_in == 1 + 3 + (uint64_t)race_calls() * 8);
    /* Every served call's handler ran (and some cancelled ones'). */
    uint64_t at_least = echo_s.served < 1024 ? echo_s.served : 1024;
    CHECK(echo_s.window <= 1024 && echo_s.window >= at_least && echo_s.handler_ns_p50 <= echo_s.handler_ns_p99 &&
          echo_s.handler_ns_p99 <= echo_s.handler_ns_max);
    /* Three cancelled while running, one answered after its deadline. */
    rpcagent_function_stats_t loop = fstats(agent, "loop");
    CHECK(loop.cancelled == 3 && loop.served == 1 && loop.failed == 0 && loop.running == 0);
    /* The 300 ms deadline ran from when rank 1 read the request, a little
     * before the handler's clock started. */
    CHECK(loop.window == 4 && loop.handler_ns_max >= 250000000ull);
    CHECK(loop.bytes_in == 0 && loop.bytes_out == 4);
    rpcagent_function_stats_t m = fstats(agent, "mark");
    CHECK(m.cancelled == 1 && m.served == 0 && m.window == 0);
    CHECK(fstats(agent, "defer").cancelled == 1 && fstats(agent, "idefer").cancelled == 1);
    printf("[cancel] rank 1's echo: %llu served, %llu cancelled; handler p50 %llu ns, p99 %llu ns, max %llu ns\n",
           (unsigned long long)echo_s.served, (unsigned long long)echo_s.cancelled,
           (unsigned long long)echo_s.handler_ns_p50, (unsigned long long)echo_s.handler_ns_p99,
           (unsigned long long)echo_s.handler_ns_max);
    /* Misuse; an older caller's smaller struct gets the fields it knows. */
    rpcagent_function_stats_t s;
    CHECK_STATUS(rpcagent_get_function_stats(agent, "nope", &s, sizeof s), RPCAGENT_ERR_NOT_FOUND);
    CHECK_STATUS(rpcagent_get_function_stats(agent, NULL, &s, sizeof s), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_get_function_stats(NULL, "echo", &s, sizeof s), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_get_function_stats(agent, "echo", NULL, sizeof s), RPCAGENT_ERR_INVALID_ARGUMENT);
    uint64_t first[2] = {7, 7};
    CHECK_OK(rpcagent_get_function_stats(agent, "mark", (rpcagent_function_stats_t *)(void *)first, 8));
    CHECK(first[0] == 0 && first[1] == 7);
}

static void body(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_OK(rpcagent_config_from_env(cfg));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    CHECK_OK(rpcagent_config_set_worker_threads(cfg, 1));
    rpcagent_t *agent = NULL;
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    CHECK_OK(rpcagent_register(agent, "loop", looping, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "mark", mark, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "defer", deferring, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "idefer", deferring, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_register(agent, "count", count, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    /* Rank 1 opens for business 300 ms after the barrier: what rank 0
     * calls meanwhile waits there for start. */
    if (rpcagent_rank(agent) == 0) CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 30000));
    if (rpcagent_rank(agent) == 1) {
        usleep(300000);
        CHECK_OK(rpcagent_start(agent));
    }

    if (rpcagent_rank(agent) == 0) {
        CHECK_STATUS(rpcagent_future_cancel(NULL), RPCAGENT_ERR_INVALID_ARGUMENT);
        CHECK(rpcagent_reply_cancelled(NULL) == 0);
        CHECK(rpcagent_deferred_cancelled(NULL) == 0);

        /* A request waiting for its destination's start, cancelled, never
         * runs (it is not counted by the function either: it never got
         * that far). */
        rpcagent_future_t *early;
        CHECK_OK(rpcagent_call_async(agent, 1, "mark", NULL, 0, -1, &early));
        usleep(50000);
        CHECK_OK(rpcagent_future_cancel(early));
        CHECK_STATUS(wait_status(early, 0), RPCAGENT_ERR_CANCELLED);
        rpcagent_future_free(early);

        /* A looping handler notices. */
        rpcagent_future_t *f;
        CHECK_OK(rpcagent_call_async(agent, 1, "loop", NULL, 0, -1, &f));
        AWAIT_THEIRS(agent, loops_started, 1);
        double t0 = now_ms();
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_STATUS(wait_status(f, 0), RPCAGENT_ERR_CANCELLED);
        CHECK(rpcagent_future_is_ready(f) == 1);
        CHECK(strstr(rpcagent_future_error(f), "cancelled") != NULL);
        AWAIT_THEIRS(agent, loops_noticed, 1);
        printf("[cancel] the handler noticed the cancel %.1f ms after it was made\n", now_ms() - t0);
        rpcagent_future_free(f);

        /* A queued request never runs: the worker is busy with a loop. */
        rpcagent_future_t *busy, *queued;
        CHECK_OK(rpcagent_call_async(agent, 1, "loop", NULL, 0, -1, &busy));
        AWAIT_THEIRS(agent, loops_started, 2);
        CHECK_OK(rpcagent_call_async(agent, 1, "mark", NULL, 0, -1, &queued));
        usleep(50000);
        CHECK(theirs(agent).marks_ran == 0);
        CHECK_OK(rpcagent_future_cancel(queued));
        CHECK_STATUS(wait_status(queued, 0), RPCAGENT_ERR_CANCELLED);
        CHECK_OK(rpcagent_future_cancel(busy));
        AWAIT_THEIRS(agent, loops_noticed, 2);
        /* The worker is free: a call queued after the mark is served (so
         * the mark's turn has come and gone). */
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"e", 1, 10000, &out));
        rpcagent_buffer_free(&out);
        CHECK(theirs(agent).marks_ran == 0);
        rpcagent_future_free(busy);
        rpcagent_future_free(queued);

        /* A deferred reply notices, and may still be completed. */
        CHECK_OK(rpcagent_call_async(agent, 1, "defer", NULL, 0, -1, &f));
        AWAIT_THEIRS(agent, defers_started, 1);
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_STATUS(wait_status(f, 0), RPCAGENT_ERR_CANCELLED);
        AWAIT_THEIRS(agent, defer_complete_ok, 1);
        CHECK(theirs(agent).defers_noticed == 1);
        rpcagent_future_free(f);

        /* The same for a reply an inline handler deferred. */
        CHECK_OK(rpcagent_call_async(agent, 1, "idefer", NULL, 0, -1, &f));
        AWAIT_THEIRS(agent, defers_started, 2);
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_STATUS(wait_status(f, 0), RPCAGENT_ERR_CANCELLED);
        AWAIT_THEIRS(agent, defer_complete_ok, 2);
        rpcagent_future_free(f);

        /* A cancel from another thread ends a wait in progress. */
        CHECK_OK(rpcagent_call_async(agent, 1, "loop", NULL, 0, -1, &f));
        AWAIT_THEIRS(agent, loops_started, 3);
        struct pending_cancel later = {f, 100};
        pthread_t canceller;
        CHECK(pthread_create(&canceller, NULL, cancel_later, &later) == 0);
        t0 = now_ms();
        CHECK_STATUS(wait_status(f, -1), RPCAGENT_ERR_CANCELLED);
        double waited = now_ms() - t0;
        pthread_join(canceller, NULL);
        printf("[cancel] a wait ended %.1f ms after it began (cancelled from another thread at 100 ms)\n", waited);
        CHECK(waited < 2000);
        AWAIT_THEIRS(agent, loops_noticed, 3);
        rpcagent_future_free(f);

        /* A deadline that passes cancels the running handler. The
         * caller's own deadline usually ends its wait first (TIMEOUT); on
         * a loaded machine the handler's answer, sent as it sees the
         * deadline a transit later, may win the race (OK, "late"). */
        CHECK_OK(rpcagent_call_async(agent, 1, "loop", NULL, 0, 300, &f));
        rpcagent_status_t timed = wait_status(f, -1);
        CHECK(timed == RPCAGENT_ERR_TIMEOUT || timed == RPCAGENT_OK);
        AWAIT_THEIRS(agent, loops_noticed, 4);
        rpcagent_future_free(f);

        /* A call to this rank itself. */
        CHECK_OK(rpcagent_call_async(agent, 0, "loop", NULL, 0, -1, &f));
        double until = now_ms() + 10000;
        while (atomic_load(&loops_started) < 1 && now_ms() < until) usleep(1000);
        CHECK(atomic_load(&loops_started) == 1);
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_STATUS(wait_status(f, 0), RPCAGENT_ERR_CANCELLED);
        while (atomic_load(&loops_noticed) < 1 && now_ms() < until) usleep(1000);
        CHECK(atomic_load(&loops_noticed) == 1);
        rpcagent_future_free(f);

        /* Cancel after completion changes nothing. */
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)"abc", 3, -1, &f));
        until = now_ms() + 10000;
        while (!rpcagent_future_is_ready(f) && now_ms() < until) usleep(100);
        CHECK_OK(rpcagent_future_cancel(f));
        CHECK_OK(rpcagent_future_wait(f, 0, &out));
        CHECK(out.len == 3 && memcmp(out.data, "abc", 3) == 0);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(f);

        race(agent);
        struct counts c = theirs(agent);
        CHECK(c.overran == 0 && c.marks_ran == 0);
    }
    CHECK_OK(rpcagent_barrier(agent, 60000));
    CHECK(atomic_load(&overran) == 0);
    if (rpcagent_rank(agent) == 1) check_function_stats(agent);
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

int main(void) { return run_world("cancel", 2, body, "RANK", "WORLD_SIZE", 240); }
