/* Sending without copies through the C ABI, in processes (a world of 2:
 * rank 0 calls, rank 1 serves), over shared memory and, in the suite's
 * second run, over TCP:
 * - rpcagent_call_async_iov: the parts arrive concatenated (empty parts,
 *   NULL ones of length 0, 3,000 parts: more than one system call takes,
 *   a 4 MiB part), n_parts 0 sends empty arguments, release NULL copies;
 *   the release runs exactly once on success, on a call that fails later
 *   (no such function) and on calls that cannot start (NULL agent, a rank
 *   out of range, NULL parts or a NULL part with a length, a total above
 *   the maximum message size: TOO_LARGE);
 * - rpcagent_reply_set_owned: the reply arrives whole and its release runs
 *   once, also when the handler then fails, when another reply replaces
 *   it, and when the call is refused (NULL data with a length);
 * - rpcagent_deferred_complete_owned from another thread: the same. */
#include "harness.h"

#include <pthread.h>
#include <stdatomic.h>

#define MAX_MESSAGE (8u << 20)
#define BIG (4u << 20)

static atomic_int releases; /* in each process, its own */

static void count_release(void *u) {
    atomic_fetch_add(&releases, 1);
    atomic_fetch_add((atomic_int *)u, 1);
}

static uint8_t *big_reply; /* rank 1's lent reply bytes */

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static atomic_int owned_released;

/* Replies with BIG lent bytes; args "fail" fail after setting them,
 * "replace" replaces them, "null" passes NULL data with a length. */
static int32_t owned(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    if (req->args_len == 4 && memcmp(req->args, "null", 4) == 0) {
        rpcagent_status_t s = rpcagent_reply_set_owned(reply, NULL, 5, count_release, &owned_released);
        return s == RPCAGENT_ERR_INVALID_ARGUMENT ? rpcagent_reply_set(reply, (const uint8_t *)"refused", 7) : 1;
    }
    CHECK_OK(rpcagent_reply_set_owned(reply, big_reply, BIG, count_release, &owned_released));
    if (req->args_len == 4 && memcmp(req->args, "fail", 4) == 0) {
        rpcagent_reply_error(reply, "failed after setting a lent reply");
        return 1;
    }
    if (req->args_len == 7 && memcmp(req->args, "replace", 7) == 0) {
        return rpcagent_reply_set(reply, (const uint8_t *)"small", 5);
    }
    return 0;
}

static void *complete_later(void *arg) {
    usleep(20000);
    CHECK_OK(rpcagent_deferred_complete_owned(arg, big_reply, BIG, count_release, &owned_released));
    return NULL;
}

static int32_t deferred_owned(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
    if (d == NULL) return 1;
    pthread_t t;
    if (pthread_create(&t, NULL, complete_later, d) != 0) return 1;
    pthread_detach(t);
    return 0;
}

static int32_t released(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    int n = atomic_load(&owned_released);
    return rpcagent_reply_set(reply, (const uint8_t *)&n, sizeof n);
}

static int their_releases(rpcagent_t *agent) {
    rpcagent_buffer_t out;
    CHECK_OK(rpcagent_call_sync(agent, 1, "released", NULL, 0, 10000, &out));
    int n;
    CHECK(out.len == sizeof n);
    memcpy(&n, out.data, sizeof n);
    rpcagent_buffer_free(&out);
    return n;
}

/* One iov call to `dst`'s `fn`: the status call_async_iov returned (and
 * the wait's, in *waited), checking the release ran exactly once by the
 * time both are done. */
static rpcagent_status_t iov_call(rpcagent_t *agent, uint32_t dst, const char *fn, const rpcagent_iovec_t *parts,
                                  size_t n, rpcagent_buffer_t *out, rpcagent_status_t *waited) {
    atomic_int mine = 0;
    rpcagent_future_t *f = (rpcagent_future_t *)1;
    rpcagent_status_t s = rpcagent_call_async_iov(agent, dst, fn, parts, n, 10000, count_release, &mine, &f);
    CHECK(atomic_load(&mine) == 1); /* done with the parts when it returns */
    *waited = s;
    memset(out, 0, sizeof *out);
    if (s == RPCAGENT_OK) {
        *waited = rpcagent_future_wait(f, -1, out);
        rpcagent_future_free(f);
    } else {
        CHECK(f == NULL);
    }
    CHECK(atomic_load(&mine) == 1);
    return s;
}

static void body(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_OK(rpcagent_config_from_env(cfg));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    CHECK_OK(rpcagent_config_set_max_message_bytes(cfg, MAX_MESSAGE));
    rpcagent_t *agent = NULL;
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    big_reply = malloc(BIG);
    CHECK(big_reply != NULL);
    fill_pattern(big_reply, BIG, 77);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "owned", owned, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "deferred_owned", deferred_owned, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "released", released, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 30000));

    if (rpcagent_rank(agent) == 0) {
        rpcagent_buffer_t out;
        rpcagent_status_t waited;

        /* Parts of every kind arrive concatenated. */
        uint8_t *tensor = malloc(BIG);
        CHECK(tensor != NULL);
        fill_pattern(tensor, BIG, 5);
        uint8_t header[16] = "header-16-bytes";
        rpcagent_iovec_t parts[] = {{header, sizeof header}, {NULL, 0}, {tensor, BIG}, {(const uint8_t *)"end", 3}};
        CHECK_OK(iov_call(agent, 1, "echo", parts, 4, &out, &waited));
        CHECK_OK(waited);
        CHECK(out.len == sizeof header + BIG + 3);
        CHECK(memcmp(out.data, header, sizeof header) == 0);
        CHECK(memcmp(out.data + sizeof header, tensor, BIG) == 0);
        CHECK(memcmp(out.data + sizeof header + BIG, "end", 3) == 0);
        rpcagent_buffer_free(&out);

        /* 3,000 small parts: more than one vectored write takes. */
        enum { MANY = 3000 };
        static rpcagent_iovec_t many[MANY];
        static uint8_t bytes[MANY * 7];
        size_t total = 0;
        for (int i = 0; i < MANY; i++) {
            size_t len = (size_t)(i % 7) + 1;
            for (size_t k = 0; k < len; k++) bytes[total + k] = (uint8_t)(i + k);
            many[i].data = bytes + total;
            many[i].len = len;
            total += len;
        }
        CHECK_OK(iov_call(agent, 1, "echo", many, MANY, &out, &waited));
        CHECK_OK(waited);
        CHECK(out.len == total && memcmp(out.data, bytes, total) == 0);
        rpcagent_buffer_free(&out);

        /* No parts at all; a call to this rank itself. */
        CHECK_OK(iov_call(agent, 1, "echo", NULL, 0, &out, &waited));
        CHECK_OK(waited);
        CHECK(out.len == 0);
        CHECK_OK(iov_call(agent, 0, "echo", parts, 4, &out, &waited));
        CHECK_OK(waited);
        CHECK(out.len == sizeof header + BIG + 3);
        rpcagent_buffer_free(&out);

        /* Without a release function the parts are copied (or sent) before
         * it returns: changing them afterwards changes nothing. */
        rpcagent_future_t *f;
        uint8_t scratch[4] = "abcd";
        rpcagent_iovec_t one = {scratch, 4};
        CHECK_OK(rpcagent_call_async_iov(agent, 1, "echo", &one, 1, 10000, NULL, NULL, &f));
        memcpy(scratch, "zzzz", 4);
        CHECK_OK(rpcagent_future_wait(f, -1, &out));
        CHECK(out.len == 4 && memcmp(out.data, "abcd", 4) == 0);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(f);

        /* Failures: the release still runs exactly once. */
        CHECK_OK(iov_call(agent, 1, "no_such_function", parts, 4, &out, &waited));
        CHECK_STATUS(waited, RPCAGENT_ERR_NOT_FOUND);
        CHECK_STATUS(iov_call(agent, 7, "echo", parts, 4, &out, &waited), RPCAGENT_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(iov_call(NULL, 1, "echo", parts, 4, &out, &waited), RPCAGENT_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(iov_call(agent, 1, "echo", NULL, 2, &out, &waited), RPCAGENT_ERR_INVALID_ARGUMENT);
        rpcagent_iovec_t holed[] = {{header, 4}, {NULL, 9}};
        CHECK_STATUS(iov_call(agent, 1, "echo", holed, 2, &out, &waited), RPCAGENT_ERR_INVALID_ARGUMENT);
        rpcagent_iovec_t too_big[] = {{tensor, BIG}, {tensor, BIG}, {header, 1}};
        CHECK_STATUS(iov_call(agent, 1, "echo", too_big, 3, &out, &waited), RPCAGENT_ERR_TOO_LARGE);
        free(tensor);

        /* Lent replies. */
        int before = their_releases(agent);
        for (int i = 0; i < 3; i++) {
            CHECK_OK(rpcagent_call_sync(agent, 1, "owned", NULL, 0, 10000, &out));
            CHECK(out.len == BIG && memcmp(out.data, big_reply, BIG) == 0);
            rpcagent_buffer_free(&out);
        }
        CHECK_STATUS(rpcagent_call_sync(agent, 1, "owned", (const uint8_t *)"fail", 4, 10000, &out),
                     RPCAGENT_ERR_HANDLER);
        CHECK_OK(rpcagent_call_sync(agent, 1, "owned", (const uint8_t *)"replace", 7, 10000, &out));
        CHECK(out.len == 5 && memcmp(out.data, "small", 5) == 0);
        rpcagent_buffer_free(&out);
        CHECK_OK(rpcagent_call_sync(agent, 1, "owned", (const uint8_t *)"null", 4, 10000, &out));
        CHECK(out.len == 7 && memcmp(out.data, "refused", 7) == 0);
        rpcagent_buffer_free(&out);
        CHECK_OK(rpcagent_call_sync(agent, 1, "deferred_owned", NULL, 0, 10000, &out));
        CHECK(out.len == BIG && memcmp(out.data, big_reply, BIG) == 0);
        rpcagent_buffer_free(&out);
        /* 3 answered + failed + replaced + refused + deferred, once each
         * (a release runs once the reply is sent: the count may trail the
         * caller's reply by a moment). */
        double until = now_ms() + 10000;
        while (their_releases(agent) < before + 7 && now_ms() < until) usleep(1000);
        usleep(50000);
        CHECK(their_releases(agent) == before + 7);
    }
    CHECK_OK(rpcagent_barrier(agent, 60000));
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
    free(big_reply);
}

int main(void) { return run_world("iov", 2, body, "RANK", "WORLD_SIZE", 240); }
