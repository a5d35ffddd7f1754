/* Two agents in one process, a TCP world and a local world, do not disturb
 * each other.
 *
 * Each of two processes holds rank r of a TCP world of 2 and a local world
 * of 2. The agents call into each other from every kind of thread:
 * - the TCP agent's inline handler "to_local" (on its I/O thread) makes an
 *   async call in the local world, completed through a callback;
 * - a completion callback of a TCP call makes a local call;
 * - the local world's pool handler "to_tcp" calls the TCP peer and waits.
 * Every call must succeed, and the local world's pool handlers must run on
 * the local world's threads only: what an I/O thread of the TCP agent is
 * must not change how the local agent dispatches (before, a request the
 * local world received on the TCP agent's I/O thread was kept and run by
 * that thread). Then the local world is freed while TCP calls go on, and
 * the TCP world shuts down gracefully. */
#include "harness.h"

#include <pthread.h>
#include <stdatomic.h>

#define MAX_THREADS 128

/* The threads that ran each agent's handlers. */
typedef struct {
    pthread_mutex_t lock;
    pthread_t ids[MAX_THREADS];
    int n;
} thread_set;

static thread_set tcp_threads = {PTHREAD_MUTEX_INITIALIZER, {0}, 0};
static thread_set local_threads = {PTHREAD_MUTEX_INITIALIZER, {0}, 0};

static void note_thread(thread_set *s) {
    pthread_t me = pthread_self();
    pthread_mutex_lock(&s->lock);
    int known = 0;
    for (int i = 0; i < s->n; i++) known |= pthread_equal(s->ids[i], me);
    if (!known) {
        CHECK(s->n < MAX_THREADS);
        s->ids[s->n++] = me;
    }
    pthread_mutex_unlock(&s->lock);
}

static rpcagent_t *tcp;
static rpcagent_t *local[2];
static atomic_int local_done, local_failed, callback_calls;

static int32_t work(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    note_thread(&local_threads);
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static void local_completed(void *f) {
    rpcagent_future_t *fut = f;
    rpcagent_buffer_t out;
    if (rpcagent_future_wait(fut, 0, &out) == RPCAGENT_OK && out.len == 4) {
        atomic_fetch_add(&local_done, 1);
    } else {
        atomic_fetch_add(&local_failed, 1);
    }
    rpcagent_buffer_free(&out);
}

/* Futures of local calls, freed at the end (a callback cannot free its own). */
static rpcagent_future_t *local_futs[4096];
static atomic_int n_local_futs;

static void call_local_async(void) {
    rpcagent_future_t *f = NULL;
    CHECK_OK(rpcagent_call_async(local[0], 1, "work", (const uint8_t *)"loca", 4, 10000, &f));
    int slot = atomic_fetch_add(&n_local_futs, 1);
    CHECK(slot < 4096);
    local_futs[slot] = f;
    CHECK_OK(rpcagent_future_on_complete(f, local_completed, f));
}

/* Inline, on the TCP agent's I/O thread. */
static int32_t to_local(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    note_thread(&tcp_threads);
    call_local_async();
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    note_thread(&tcp_threads);
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

/* A local pool handler that calls the TCP peer and waits. */
static int32_t to_tcp(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    note_thread(&local_threads);
    uint32_t peer = 1 - rpcagent_rank(tcp);
    rpcagent_buffer_t out;
    int32_t st = rpcagent_call_sync(tcp, peer, "echo", req->args, req->args_len, 10000, &out);
    if (st != RPCAGENT_OK) return 1;
    st = rpcagent_reply_set(reply, out.data, out.len);
    rpcagent_buffer_free(&out);
    return st;
}

/* A TCP call's completion callback makes a local call. */
static void tcp_completed(void *u) {
    (void)u;
    call_local_async();
    atomic_fetch_add(&callback_calls, 1);
}

static void body(void) {
    tcp = join_from_env();
    uint32_t me = rpcagent_rank(tcp), peer = 1 - me;
    CHECK_OK(rpcagent_register(tcp, "to_local", to_local, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_register(tcp, "echo", echo, NULL, NULL, 0));

    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK_OK(rpcagent_config_set_worker_threads(cfg, 2));
    CHECK_OK(rpcagent_init_local(2, cfg, local));
    rpcagent_config_free(cfg);
    for (int i = 0; i < 2; i++) {
        CHECK_OK(rpcagent_register(local[i], "work", work, NULL, NULL, 0));
        CHECK_OK(rpcagent_register(local[i], "to_tcp", to_tcp, NULL, NULL, 0));
        CHECK_OK(rpcagent_start(local[i]));
    }
    CHECK_OK(rpcagent_start(tcp));
    CHECK_OK(rpcagent_barrier(tcp, 30000));

    /* The peer's inline handler calls its local world: 16 in flight. */
    enum { ROUNDS = 40, DEPTH = 16 };
    for (int round = 0; round < ROUNDS; round++) {
        rpcagent_future_t *fs[DEPTH];
        for (int i = 0; i < DEPTH; i++) {
            CHECK_OK(rpcagent_call_async(tcp, peer, "to_local", (const uint8_t *)"tcp!", 4, 10000, &fs[i]));
            if (i == 0) CHECK_OK(rpcagent_future_on_complete(fs[i], tcp_completed, NULL));
        }
        for (int i = 0; i < DEPTH; i++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_future_wait(fs[i], RPCAGENT_WAIT_FOREVER, &out));
            CHECK(out.len == 4 && memcmp(out.data, "tcp!", 4) == 0);
            rpcagent_buffer_free(&out);
            rpcagent_future_free(fs[i]);
        }
        /* The local world calls across to the TCP peer. */
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(local[round % 2], 1 - round % 2, "to_tcp", (const uint8_t *)"loop", 4, 10000, &out));
        CHECK(out.len == 4 && memcmp(out.data, "loop", 4) == 0);
        rpcagent_buffer_free(&out);
    }
    CHECK_OK(rpcagent_barrier(tcp, 30000));

    /* Every local call made here finished, through its callback. */
    int expected = ROUNDS * DEPTH + ROUNDS;
    double until = now_ms() + 10000;
    while (atomic_load(&local_done) + atomic_load(&local_failed) < expected && now_ms() < until) usleep(1000);
    CHECK(atomic_load(&callback_calls) == ROUNDS);
    CHECK(atomic_load(&local_failed) == 0);
    CHECK(atomic_load(&local_done) == expected);

    /* The local world's handlers ran on its own threads only. */
    for (int i = 0; i < local_threads.n; i++) {
        for (int j = 0; j < tcp_threads.n; j++) {
            if (pthread_equal(local_threads.ids[i], tcp_threads.ids[j])) {
                fprintf(stderr, "rank %u: a local-world handler ran on a thread of the TCP agent\n", me);
                exit(1);
            }
        }
    }

    /* The local world goes; the TCP world goes on. */
    for (int i = 0; i < atomic_load(&n_local_futs); i++) rpcagent_future_free(local_futs[i]);
    rpcagent_free(local[0]);
    rpcagent_free(local[1]);
    for (int i = 0; i < 100; i++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(tcp, peer, "echo", (const uint8_t *)"more", 4, 10000, &out));
        CHECK(out.len == 4);
        rpcagent_buffer_free(&out);
    }
    printf("rank %u: %d local calls from TCP threads and callbacks, handlers on %d local and %d TCP threads\n",
           me, expected, local_threads.n, tcp_threads.n);
    CHECK_OK(rpcagent_shutdown(tcp, 1, 30000));
    rpcagent_free(tcp);
}

int main(void) {
    return run_world("a TCP world and a local world in one process", 2, body, "RANK", "WORLD_SIZE", 120);
}
