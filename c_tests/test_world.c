/* Three ranks as three processes (torchrun's variables): every rank calls
 * every rank with payloads up to 64 MiB, synchronously and through futures
 * (wait, wait_any, is_ready, on_complete); errors and deadlines; barrier,
 * stats, rank_of; graceful shutdown. */
#include <pthread.h>
#include <stdatomic.h>

#include "harness.h"

static int32_t echo(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)user_data;
    uint8_t *out = rpcagent_reply_alloc(reply, req->args_len);
    if (req->args_len > 0 && out == NULL) return 1;
    if (req->args_len > 0) memcpy(out, req->args, req->args_len);
    return 0;
}

static int32_t fails(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)user_data;
    (void)req;
    rpcagent_reply_error(reply, "bad input: 42");
    return 1;
}

static int32_t returns_code(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)user_data;
    (void)req;
    (void)reply;
    return 7;
}

static int32_t slow(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)user_data;
    (void)req;
    (void)reply;
    usleep(2000 * 1000);
    return 0;
}

static atomic_int completions;
static void on_done(void *user_data) {
    atomic_fetch_add(&completions, 1);
    atomic_fetch_add((atomic_int *)user_data, 1);
}

static void body(void) {
    rpcagent_t *agent = join_from_env();
    uint32_t me = rpcagent_rank(agent), n = rpcagent_world_size(agent);
    CHECK(n == 3);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "fails", fails, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "code", returns_code, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "slow", slow, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 30000));

    size_t sizes[] = {0, 1, 1024, 1 << 20, 64 << 20};
    size_t big = max_payload();
    uint8_t *args = malloc(big);
    CHECK(args != NULL);
    for (uint32_t dst = 0; dst < n; dst++) {
        char name[32];
        snprintf(name, sizeof name, "worker%u", dst);
        uint32_t found = 99;
        CHECK_OK(rpcagent_rank_of(agent, name, &found));
        CHECK(found == dst);
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            size_t len = sizes[i] > big ? big : sizes[i];
            fill_pattern(args, len, me * 100 + dst * 10 + (unsigned)i);
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agent, dst, "echo", args, len, RPCAGENT_TIMEOUT_DEFAULT, &out));
            CHECK(out.len == len);
            CHECK(len == 0 || memcmp(out.data, args, len) == 0);
            rpcagent_buffer_free(&out);
            CHECK(out.data == NULL && out.len == 0);
        }
        /* Futures: several in flight, completed in any order. */
        enum { K = 8 };
        rpcagent_future_t *futures[K];
        atomic_int mine = 0;
        atomic_store(&completions, 0);
        for (int k = 0; k < K; k++) {
            uint8_t b = (uint8_t)(k + 1);
            CHECK_OK(rpcagent_call_async(agent, dst, "echo", &b, 1, 10000, &futures[k]));
            CHECK_OK(rpcagent_future_on_complete(futures[k], on_done, &mine));
        }
        size_t index = K;
        CHECK_OK(rpcagent_future_wait_any(futures, K, RPCAGENT_WAIT_FOREVER, &index));
        CHECK(index < K);
        CHECK(rpcagent_future_is_ready(futures[index]) == 1);
        for (int k = 0; k < K; k++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_future_wait(futures[k], RPCAGENT_WAIT_FOREVER, &out));
            CHECK(out.len == 1 && out.data[0] == (uint8_t)(k + 1));
            rpcagent_buffer_free(&out);
            /* A second wait: same status, empty buffer. */
            CHECK_OK(rpcagent_future_wait(futures[k], 0, &out));
            CHECK(out.len == 0);
            CHECK(rpcagent_future_error(futures[k]) == NULL);
            rpcagent_future_free(futures[k]);
        }
        /* Callbacks run on the library thread that completed each call,
         * which may still be running them when the waits return. */
        double until = now_ms() + 5000;
        while (atomic_load(&mine) < K && now_ms() < until) usleep(1000);
        CHECK(atomic_load(&mine) == K);
    }
    free(args);

    if (me == 0) {
        rpcagent_buffer_t out;
        CHECK_STATUS(rpcagent_call_sync(agent, 1, "missing", NULL, 0, -1, &out), RPCAGENT_ERR_NOT_FOUND);
        CHECK(strstr(rpcagent_last_error(), "missing") != NULL);
        CHECK(out.data == NULL && out.len == 0);

        CHECK_STATUS(rpcagent_call_sync(agent, 1, "fails", NULL, 0, -1, &out), RPCAGENT_ERR_HANDLER);
        CHECK(strstr(rpcagent_last_error(), "bad input: 42") != NULL);
        CHECK(strstr(rpcagent_last_error(), "rank 1") != NULL);

        CHECK_STATUS(rpcagent_call_sync(agent, 2, "code", NULL, 0, -1, &out), RPCAGENT_ERR_HANDLER);
        CHECK(strstr(rpcagent_last_error(), "7") != NULL);

        /* The error text also lives in the future, for threads that hop. */
        rpcagent_future_t *f = NULL;
        CHECK_OK(rpcagent_call_async(agent, 2, "fails", NULL, 0, -1, &f));
        CHECK_STATUS(rpcagent_future_wait(f, -1, &out), RPCAGENT_ERR_HANDLER);
        CHECK(out.data == NULL && out.len == 0);
        CHECK(rpcagent_future_error(f) != NULL && strstr(rpcagent_future_error(f), "bad input") != NULL);
        rpcagent_future_free(f);

        double t0 = now_ms();
        CHECK_STATUS(rpcagent_call_sync(agent, 1, "slow", NULL, 0, 300, &out), RPCAGENT_ERR_TIMEOUT);
        double took = now_ms() - t0;
        CHECK(took >= 300 && took < 400);

        /* A pending future: wait(0) says PENDING and the future stays valid. */
        CHECK_OK(rpcagent_call_async(agent, 2, "slow", NULL, 0, 5000, &f));
        CHECK_STATUS(rpcagent_future_wait(f, 0, &out), RPCAGENT_PENDING);
        CHECK_STATUS(rpcagent_future_wait(f, 0, NULL), RPCAGENT_ERR_INVALID_ARGUMENT);
        CHECK(rpcagent_future_is_ready(f) == 0);
        size_t idx = 9;
        CHECK_STATUS(rpcagent_future_wait_any(&f, 1, 50, &idx), RPCAGENT_PENDING);
        CHECK_OK(rpcagent_future_wait(f, -1, &out));
        rpcagent_buffer_free(&out);
        rpcagent_future_free(f);

        rpcagent_stats_t stats;
        CHECK_OK(rpcagent_get_stats(agent, &stats, sizeof stats));
        CHECK(stats.calls_timed_out == 1);
        CHECK(stats.calls_failed == 4);
        CHECK(stats.calls_in_flight == 0);
        CHECK(stats.calls_ok > 0 && stats.bytes_sent > 0 && stats.bytes_received > 0);
        /* Every call started ends as exactly one of these. */
        CHECK(stats.calls_started == stats.calls_ok + stats.calls_failed + stats.calls_timed_out);
    }
    CHECK_OK(rpcagent_barrier(agent, 30000));
    rpcagent_stats_t stats;
    CHECK_OK(rpcagent_get_stats(agent, &stats, sizeof stats));
    CHECK(stats.requests_served >= 3 * 13);

    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_buffer_t out;
    CHECK_STATUS(rpcagent_call_sync(agent, 0, "echo", NULL, 0, -1, &out), RPCAGENT_ERR_SHUTDOWN);
    rpcagent_future_t *f = (rpcagent_future_t *)1;
    CHECK_STATUS(rpcagent_call_async(agent, 0, "echo", NULL, 0, -1, &f), RPCAGENT_ERR_SHUTDOWN);
    CHECK(f == NULL);
    rpcagent_free(agent);
}

int main(void) { return run_world("world", 3, body, "RANK", "WORLD_SIZE", 240); }
