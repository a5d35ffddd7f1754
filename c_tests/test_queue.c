/* Completion queues and wait_any, from C, across two processes.
 *
 * Rank 1 serves; rank 0 checks: each tag exactly once, in completion order;
 * PENDING on timeout; tags of futures freed before they completed; failed
 * calls; a second attach refused; two threads waiting on one queue; the
 * queue's fd readable exactly while tags wait (poll); one queue serving two
 * agents; wait_any over 10,000 futures, every reply checked; and replies
 * that come after their caller stopped waiting (its wait answered, calls
 * still in flight) still reach their completion callbacks. */
#include "harness.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

/* Sleeps the number of milliseconds in its argument, then answers. */
static int32_t delay(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    uint32_t ms = 0;
    if (req->args_len != sizeof ms) return 1;
    memcpy(&ms, req->args, sizeof ms);
    usleep(ms * 1000);
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static int32_t fail(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    (void)reply;
    return 1;
}

static int readable(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, timeout_ms);
    CHECK(n >= 0);
    return n == 1 && (p.revents & POLLIN);
}

static rpcagent_future_t *call_delay(rpcagent_t *agent, uint32_t ms) {
    rpcagent_future_t *f = NULL;
    CHECK_OK(rpcagent_call_async(agent, 1, "delay", (const uint8_t *)&ms, sizeof ms, 10000, &f));
    return f;
}

static uint64_t take(rpcagent_queue_t *q) {
    uint64_t tag = 0;
    CHECK_OK(rpcagent_queue_wait(q, 10000, &tag));
    return tag;
}

/* Two threads take tags from one queue; each records what it took. */
enum { SHARED_CALLS = 2000 };
static atomic_int taken_count[SHARED_CALLS];
static atomic_int taken_total;

static void *taker(void *arg) {
    rpcagent_queue_t *q = arg;
    while (atomic_load(&taken_total) < SHARED_CALLS) {
        uint64_t tag;
        rpcagent_status_t st = rpcagent_queue_wait(q, 100, &tag);
        if (st == RPCAGENT_PENDING) continue;
        CHECK_OK(st);
        CHECK(tag < SHARED_CALLS);
        atomic_fetch_add(&taken_count[tag], 1);
        atomic_fetch_add(&taken_total, 1);
    }
    return NULL;
}

static void check_queue(rpcagent_t *agent) {
    rpcagent_queue_t *q = NULL;
    CHECK_OK(rpcagent_queue_new(&q));
    int fd = rpcagent_queue_fd(q);
    CHECK(fd >= 0);
    CHECK(rpcagent_queue_fd(q) == fd);
    CHECK(!readable(fd, 0));

    /* Completion order, not issue order. */
    rpcagent_future_t *slow = call_delay(agent, 400), *fast = call_delay(agent, 10), *mid = call_delay(agent, 200);
    CHECK_OK(rpcagent_future_notify(slow, q, 1));
    CHECK_OK(rpcagent_future_notify(fast, q, 2));
    CHECK_OK(rpcagent_future_notify(mid, q, 3));
    CHECK_STATUS(rpcagent_future_notify(fast, q, 9), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK(readable(fd, 5000));
    CHECK(take(q) == 2);
    CHECK(!readable(fd, 0));
    CHECK(take(q) == 3);
    CHECK(take(q) == 1);
    CHECK(!readable(fd, 0));
    rpcagent_future_t *done[3] = {slow, fast, mid};
    for (int i = 0; i < 3; i++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_future_wait(done[i], 0, &out));
        CHECK(out.len == 4);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(done[i]);
    }

    /* PENDING on timeout: at once with 0, after the wait otherwise. */
    uint64_t tag = 77;
    CHECK_STATUS(rpcagent_queue_wait(q, 0, &tag), RPCAGENT_PENDING);
    double t0 = now_ms();
    CHECK_STATUS(rpcagent_queue_wait(q, 100, &tag), RPCAGENT_PENDING);
    CHECK(now_ms() - t0 >= 90);

    /* A freed future's tag still comes; failed calls post too. */
    rpcagent_future_t *freed = call_delay(agent, 50);
    CHECK_OK(rpcagent_future_notify(freed, q, 10));
    rpcagent_future_free(freed);
    rpcagent_future_t *failing = NULL, *missing = NULL;
    CHECK_OK(rpcagent_call_async(agent, 1, "fail", NULL, 0, 10000, &failing));
    CHECK_OK(rpcagent_call_async(agent, 1, "no such function", NULL, 0, 10000, &missing));
    CHECK_OK(rpcagent_future_notify(failing, q, 20));
    CHECK_OK(rpcagent_future_notify(missing, q, 21));
    int seen = 0;
    for (int i = 0; i < 3; i++) {
        uint64_t t = take(q);
        CHECK(t == 10 || t == 20 || t == 21);
        seen |= t == 10 ? 1 : t == 20 ? 2 : 4;
    }
    CHECK(seen == 7);
    rpcagent_buffer_t out;
    CHECK_STATUS(rpcagent_future_wait(failing, 0, &out), RPCAGENT_ERR_HANDLER);
    CHECK_STATUS(rpcagent_future_wait(missing, 0, &out), RPCAGENT_ERR_NOT_FOUND);
    /* Attached after it completed: posted at once; attached twice: refused. */
    rpcagent_future_t *finished = NULL;
    CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)"f", 1, 10000, &finished));
    CHECK_OK(rpcagent_future_wait(finished, RPCAGENT_WAIT_FOREVER, &out));
    rpcagent_buffer_free(&out);
    CHECK_OK(rpcagent_future_notify(finished, q, 30));
    CHECK_STATUS(rpcagent_future_notify(finished, q, 31), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_OK(rpcagent_queue_wait(q, 0, &tag));
    CHECK(tag == 30);
    CHECK_STATUS(rpcagent_queue_wait(q, 0, &tag), RPCAGENT_PENDING);
    rpcagent_future_free(finished);
    rpcagent_future_free(failing);
    rpcagent_future_free(missing);

    /* One queue, two agents: a local world's call posts here too. */
    rpcagent_t *local = NULL;
    CHECK_OK(rpcagent_init_local(1, NULL, &local));
    CHECK_OK(rpcagent_register(local, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(local));
    rpcagent_future_t *here = NULL, *there = NULL;
    CHECK_OK(rpcagent_call_async(local, 0, "echo", (const uint8_t *)"l", 1, 10000, &here));
    CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)"t", 1, 10000, &there));
    CHECK_OK(rpcagent_future_notify(here, q, 40));
    CHECK_OK(rpcagent_future_notify(there, q, 41));
    uint64_t a = take(q), b = take(q);
    CHECK((a == 40 && b == 41) || (a == 41 && b == 40));
    rpcagent_future_free(here);
    rpcagent_future_free(there);
    rpcagent_free(local);

    /* Two threads waiting on one queue: each tag to exactly one of them. */
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&threads[i], NULL, taker, q) == 0);
    for (int i = 0; i < SHARED_CALLS; i++) {
        rpcagent_future_t *f = NULL;
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)&i, sizeof i, 10000, &f));
        CHECK_OK(rpcagent_future_notify(f, q, (uint64_t)i));
        rpcagent_future_free(f);
    }
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < SHARED_CALLS; i++) CHECK(atomic_load(&taken_count[i]) == 1);
    CHECK(!readable(fd, 0));

    /* Freed with calls still attached: their tags are dropped. */
    rpcagent_future_t *late = call_delay(agent, 100);
    CHECK_OK(rpcagent_future_notify(late, q, 50));
    rpcagent_queue_free(q);
    CHECK_OK(rpcagent_future_wait(late, RPCAGENT_WAIT_FOREVER, &out));
    rpcagent_buffer_free(&out);
    rpcagent_future_free(late);

    /* Bad input. */
    CHECK(rpcagent_queue_fd(NULL) == -1);
    CHECK_STATUS(rpcagent_queue_new(NULL), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_queue_wait(NULL, 0, &tag), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_future_notify(NULL, NULL, 0), RPCAGENT_ERR_INVALID_ARGUMENT);
    printf("queue: completion order, timeouts, freed futures, failures, two agents, two waiters, fd: ok\n");
}

/* wait_any over 10,000 futures: every one comes back once, its reply right. */
static void check_wait_any(rpcagent_t *agent) {
    enum { N = 10000 };
    static rpcagent_future_t *futs[N];
    static uint32_t ids[N];
    for (uint32_t i = 0; i < N; i++) {
        ids[i] = i;
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)&i, sizeof i, 30000, &futs[i]));
    }
    size_t n = N;
    int returned = 0;
    while (n > 0) {
        size_t idx = n;
        CHECK_OK(rpcagent_future_wait_any(futs, n, 30000, &idx));
        CHECK(idx < n);
        CHECK(rpcagent_future_is_ready(futs[idx]));
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_future_wait(futs[idx], 0, &out));
        uint32_t got;
        CHECK(out.len == sizeof got);
        memcpy(&got, out.data, sizeof got);
        CHECK(got == ids[idx]);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(futs[idx]);
        /* Swap the last one in: the array changes in one place per call. */
        n--;
        futs[idx] = futs[n];
        ids[idx] = ids[n];
        returned++;
    }
    CHECK(returned == N);
    /* Timeout: PENDING. */
    rpcagent_future_t *slow = call_delay(agent, 300);
    size_t idx = 99;
    CHECK_STATUS(rpcagent_future_wait_any(&slow, 1, 20, &idx), RPCAGENT_PENDING);
    CHECK_OK(rpcagent_future_wait_any(&slow, 1, 5000, &idx));
    CHECK(idx == 0);
    rpcagent_future_free(slow);
    printf("wait_any over %d futures: each returned once, replies right\n", N);
}

/* A call whose future is freed and replaced at the same index (its slot's
 * memory is likely reused for the new call) must still be seen: a fast call
 * replaced 30 times beside a 5 s one always comes back first. Two threads
 * waiting on the same array both see a completion. */
static rpcagent_future_t *shared_pair[2];
static atomic_int other_saw = -1;

static void *other_waiter(void *arg) {
    (void)arg;
    size_t idx = 99;
    CHECK_OK(rpcagent_future_wait_any(shared_pair, 2, 5000, &idx));
    atomic_store(&other_saw, (int)idx);
    return NULL;
}

static void check_wait_any_reuse(rpcagent_t *agent) {
    rpcagent_future_t *pair[2];
    pair[0] = call_delay(agent, 5000);
    double t0 = now_ms();
    for (int round = 0; round < 30; round++) {
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)"x", 1, 10000, &pair[1]));
        size_t idx = 99;
        CHECK_OK(rpcagent_future_wait_any(pair, 2, 10000, &idx));
        CHECK(idx == 1);
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_future_wait(pair[1], 0, &out));
        rpcagent_buffer_free(&out);
        rpcagent_future_free(pair[1]);
    }
    CHECK(now_ms() - t0 < 3500);
    CHECK(!rpcagent_future_is_ready(pair[0]));

    /* Two waiters, one array: both wake for one completion. */
    shared_pair[0] = pair[0];
    CHECK_OK(rpcagent_call_async(agent, 1, "delay", (const uint8_t *)&(uint32_t){400}, 4, 10000, &shared_pair[1]));
    pthread_t t;
    CHECK(pthread_create(&t, NULL, other_waiter, NULL) == 0);
    usleep(50 * 1000); /* the other thread is asleep in wait_any by now */
    size_t idx = 99;
    CHECK_OK(rpcagent_future_wait_any(shared_pair, 2, 5000, &idx));
    CHECK(idx == 1);
    pthread_join(t, NULL);
    CHECK(atomic_load(&other_saw) == 1);
    CHECK(!rpcagent_future_is_ready(pair[0]));
    rpcagent_future_free(shared_pair[1]);
    rpcagent_future_free(pair[0]);
    printf("wait_any: replaced futures seen at once; two waiters on one array both woke\n");
}

/* Sleeps the number of microseconds in its argument, then answers. */
static int32_t delay_us(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    uint32_t us = 0;
    if (req->args_len != sizeof us) return 1;
    memcpy(&us, req->args, sizeof us);
    usleep(us);
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

/* A caller's wait is answered while its other calls are in flight, and it
 * stops waiting: their replies must still run their callbacks, answered
 * (not timed out). The caller parks the connection when its wait is
 * answered (it would come back for the rest); the I/O thread reads it once
 * the caller has not come back for a millisecond, and says so at debug
 * level, which this test counts: the parking and its way out were both
 * exercised. `by_queue`: waits on a completion queue, else with wait_any. */
enum { LEFT_CALLS = 64 };
static atomic_int left_done;
static atomic_int taken_over;

static void count_done(void *u) {
    (void)u;
    atomic_fetch_add(&left_done, 1);
}

static void count_taken_over(void *u, int32_t level, const char *message) {
    (void)u;
    if (level == RPCAGENT_LOG_DEBUG && strstr(message, "did not wait on it again")) atomic_fetch_add(&taken_over, 1);
}

static rpcagent_future_t *call_us(rpcagent_t *agent, uint32_t us) {
    rpcagent_future_t *f = NULL;
    CHECK_OK(rpcagent_call_async(agent, 1, "delay_us", (const uint8_t *)&us, sizeof us, 60000, &f));
    return f;
}

static void check_left_waiting(rpcagent_t *agent, int by_queue) {
    rpcagent_future_t *futs[LEFT_CALLS];
    rpcagent_queue_t *q = NULL;
    CHECK_OK(rpcagent_queue_new(&q));
    atomic_store(&left_done, 0);
    atomic_store(&taken_over, 0);
    CHECK_OK(rpcagent_set_log_callback(count_taken_over, NULL));
    CHECK_OK(rpcagent_set_log_level(RPCAGENT_LOG_DEBUG));
    enum { ROUNDS = 5 };
    for (int round = 0; round < ROUNDS; round++) {
        int base = atomic_load(&left_done);
        /* The calls answered once the caller is gone, then the one its wait
         * takes: served on the peer's I/O thread, so answered within tens of
         * microseconds, while the caller reads. */
        for (int i = 1; i < LEFT_CALLS; i++) futs[i] = call_us(agent, 30000);
        uint32_t quick = 0;
        CHECK_OK(rpcagent_call_async(agent, 1, "echo_inline", (const uint8_t *)&quick, sizeof quick, 60000, &futs[0]));
        for (int i = 0; i < LEFT_CALLS; i++) {
            if (by_queue) CHECK_OK(rpcagent_future_notify(futs[i], q, (uint64_t)i));
            CHECK_OK(rpcagent_future_on_complete(futs[i], count_done, NULL));
        }
        if (by_queue) {
            CHECK(take(q) == 0);
        } else {
            size_t idx = LEFT_CALLS;
            CHECK_OK(rpcagent_future_wait_any(futs, LEFT_CALLS, 30000, &idx));
            CHECK(idx == 0);
        }
        double start = now_ms();
        while (atomic_load(&left_done) < base + LEFT_CALLS && now_ms() - start < 10000) usleep(1000);
        double took = now_ms() - start;
        if (atomic_load(&left_done) != base + LEFT_CALLS)
            fprintf(stderr, "round %d: %d of %d callbacks ran in %.0f ms\n", round,
                    atomic_load(&left_done) - base, LEFT_CALLS, took);
        CHECK(atomic_load(&left_done) == base + LEFT_CALLS);
        for (int i = 0; i < LEFT_CALLS; i++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_future_wait(futs[i], 0, &out));
            rpcagent_buffer_free(&out);
            rpcagent_future_free(futs[i]);
        }
        /* The tags were posted: take them, so the next round starts empty. */
        if (by_queue)
            for (int i = 1; i < LEFT_CALLS; i++) (void)take(q);
    }
    CHECK_OK(rpcagent_set_log_level(RPCAGENT_LOG_WARN));
    CHECK_OK(rpcagent_set_log_callback(NULL, NULL));
    printf("left waiting (%s): every callback ran; the I/O thread took over a parked connection in %d of %d rounds\n",
           by_queue ? "queue" : "wait_any", atomic_load(&taken_over), ROUNDS);
    CHECK(atomic_load(&taken_over) > 0);
    rpcagent_queue_free(q);
}

static void body(void) {
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "delay", delay, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "delay_us", delay_us, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "echo_inline", echo, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_register(agent, "fail", fail, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    if (rpcagent_rank(agent) == 0) {
        /* First: no call of another check may be in flight (a caller parks
         * only when all in flight to the rank are its own). */
        check_left_waiting(agent, 0);
        check_left_waiting(agent, 1);
        check_queue(agent);
        check_wait_any(agent);
        check_wait_any_reuse(agent);
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 60000));
    rpcagent_free(agent);
}

int main(void) {
    return run_world("queues and wait_any", 2, body, "RANK", "WORLD_SIZE", 120);
}
