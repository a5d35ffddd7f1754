/* Transport selection, through the C ABI, in processes:
 * - rpcagent_config_set_transport and RPCAGENT_TRANSPORT accept "auto" and
 *   "tcp" and refuse anything else with RPCAGENT_ERR_INVALID_ARGUMENT;
 * - rpcagent_peer_transport: "self" for the own rank (under either
 *   setting), NULL for another rank until the first call to it, then
 *   "shm" (same host, `auto`) or "tcp" (`RPCAGENT_TRANSPORT=tcp`), NULL
 *   out of range or for a NULL agent; "self" and "local" in an
 *   in-process world;
 * - calls to the own rank never touch a socket (once both ranks called
 *   each other, the process's socket count does not move over 2,000
 *   calls to itself and 64 more in flight, twice), and keep their semantics:
 *   pool and inline handlers, a handler calling its own rank, errors,
 *   deadlines, wait_any and a completion queue.
 * - an idle agent uses no CPU: with every connection open and nothing in
 *   flight, a rank's process uses < 1% of a core over 5 s (getrusage).
 * - rpcagent_config_set_spin_us accepts 0 to 1000000;
 *   rpcagent_config_set_shm_ring_bytes powers of two from 4096 to 2^30.
 * A world of 2 runs twice: with the default settings, and with
 * RPCAGENT_TRANSPORT=tcp and RPCAGENT_SPIN_US=0. */
#include <dirent.h>
#include <pthread.h>
#include <sys/resource.h>

#include "harness.h"

static rpcagent_t *agent;

/* How calls to the other rank (on this host) travel under this run's setting. */
static const char *expected_other(void) {
    const char *t = getenv("RPCAGENT_TRANSPORT");
    return (t && strcmp(t, "tcp") == 0) ? "tcp" : "shm";
}

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static int32_t fail_it(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    return rpcagent_reply_error(reply, "refused on purpose");
}

static int32_t slow(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    usleep(300 * 1000);
    return rpcagent_reply_set(reply, (const uint8_t *)"late", 4);
}

/* Calls its own rank's "echo" from inside a handler and answers with that. */
static int32_t nested(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    rpcagent_buffer_t out;
    rpcagent_status_t s = rpcagent_call_sync(agent, rpcagent_rank(agent), "echo", req->args, req->args_len, 5000, &out);
    if (s != RPCAGENT_OK) return rpcagent_reply_error(reply, rpcagent_status_str(s));
    int32_t rc = rpcagent_reply_set(reply, out.data, out.len);
    rpcagent_buffer_free(&out);
    return rc;
}

static int sockets_open(void) {
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int n = 0;
    struct dirent *e;
    char path[300], target[300];
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(path, target, sizeof target - 1);
        if (len <= 0) continue;
        target[len] = 0;
        n += strncmp(target, "socket:", 7) == 0;
    }
    closedir(d);
    return n;
}

static void check_echo(uint32_t dst, const char *fn, const char *text) {
    rpcagent_buffer_t out;
    CHECK_OK(rpcagent_call_sync(agent, dst, fn, (const uint8_t *)text, strlen(text), 10000, &out));
    CHECK(out.len == strlen(text) && memcmp(out.data, text, out.len) == 0);
    rpcagent_buffer_free(&out);
}

static void each_rank(void) {
    agent = join_from_env();
    uint32_t me = rpcagent_rank(agent), other = 1 - me;
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "echo_inline", echo, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_register(agent, "fail", fail_it, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "slow", slow, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "nested", nested, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));

    /* Before any call: the own rank is "self", the other not known yet. */
    CHECK(strcmp(rpcagent_peer_transport(agent, me), "self") == 0);
    CHECK(rpcagent_peer_transport(agent, other) == NULL);
    CHECK(rpcagent_peer_transport(agent, 2) == NULL);
    CHECK(rpcagent_peer_transport(NULL, 0) == NULL);

    /* The other rank: shared memory (or TCP if asked) once called. */
    check_echo(other, "echo", "over there");
    CHECK(strcmp(rpcagent_peer_transport(agent, other), expected_other()) == 0);
    /* Both ranks have called each other: every connection is open now. */
    CHECK_OK(rpcagent_barrier(agent, 30000));

    /* Calls to self: no socket opens or closes. */
    int sockets = sockets_open();
    for (int i = 0; i < 1000; i++) {
        check_echo(me, "echo", "to myself");
        check_echo(me, (i % 2) ? "echo_inline" : "nested", "and again");
    }
    CHECK(sockets_open() == sockets);
    rpcagent_buffer_t out;
    CHECK_STATUS(rpcagent_call_sync(agent, me, "fail", NULL, 0, 5000, &out), RPCAGENT_ERR_HANDLER);
    CHECK_STATUS(rpcagent_call_sync(agent, me, "missing", NULL, 0, 5000, &out), RPCAGENT_ERR_NOT_FOUND);
    double t0 = now_ms();
    CHECK_STATUS(rpcagent_call_sync(agent, me, "slow", NULL, 0, 50, &out), RPCAGENT_ERR_TIMEOUT);
    CHECK(now_ms() - t0 < 250);

    /* Many self calls in flight, taken with wait_any and with a queue. */
    enum { N = 64 };
    rpcagent_future_t *fs[N];
    rpcagent_queue_t *q = NULL;
    CHECK_OK(rpcagent_queue_new(&q));
    for (int i = 0; i < N; i++) {
        CHECK_OK(rpcagent_call_async(agent, me, "echo", (const uint8_t *)&i, sizeof i, 10000, &fs[i]));
    }
    int seen[N] = {0};
    for (size_t left = N; left > 0; left--) {
        size_t idx;
        CHECK_OK(rpcagent_future_wait_any(fs, left, 10000, &idx));
        CHECK(idx < left);
        rpcagent_buffer_t r;
        CHECK_OK(rpcagent_future_wait(fs[idx], 0, &r));
        int sent;
        CHECK(r.len == sizeof sent);
        memcpy(&sent, r.data, sizeof sent);
        CHECK(sent >= 0 && sent < N && !seen[sent]);
        seen[sent] = 1;
        rpcagent_buffer_free(&r);
        rpcagent_future_free(fs[idx]);
        fs[idx] = fs[left - 1]; /* the last one takes its place */
    }
    for (int i = 0; i < N; i++) {
        CHECK_OK(rpcagent_call_async(agent, me, "echo", (const uint8_t *)&i, sizeof i, 10000, &fs[i]));
        CHECK_OK(rpcagent_future_notify(fs[i], q, (uint64_t)i));
    }
    for (int done = 0; done < N; done++) {
        uint64_t tag;
        CHECK_OK(rpcagent_queue_wait(q, 10000, &tag));
        CHECK(tag < N && fs[tag] != NULL);
        CHECK_OK(rpcagent_future_wait(fs[tag], 0, &out));
        CHECK(out.len == sizeof(int) && memcmp(out.data, &(int){(int)tag}, sizeof(int)) == 0);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(fs[tag]);
        fs[tag] = NULL;
    }
    rpcagent_queue_free(q);
    CHECK(sockets_open() == sockets);
    CHECK(strcmp(rpcagent_peer_transport(agent, me), "self") == 0);
    CHECK(strcmp(rpcagent_peer_transport(agent, other), expected_other()) == 0);

    /* Idle: every connection open, nothing in flight, for 5 s. */
    CHECK_OK(rpcagent_barrier(agent, 30000));
    struct rusage before, after;
    CHECK(getrusage(RUSAGE_SELF, &before) == 0);
    double t0_idle = now_ms();
    usleep(5 * 1000 * 1000);
    CHECK(getrusage(RUSAGE_SELF, &after) == 0);
    double wall_ms = now_ms() - t0_idle;
    double cpu_ms = (after.ru_utime.tv_sec - before.ru_utime.tv_sec) * 1e3 +
                    (after.ru_utime.tv_usec - before.ru_utime.tv_usec) / 1e3 +
                    (after.ru_stime.tv_sec - before.ru_stime.tv_sec) * 1e3 +
                    (after.ru_stime.tv_usec - before.ru_stime.tv_usec) / 1e3;
    printf("rank %u idle: %.1f ms of CPU in %.0f ms\n", me, cpu_ms, wall_ms);
    CHECK(cpu_ms < 0.01 * wall_ms);

    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

static void bad_env_body(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_STATUS(rpcagent_config_from_env(cfg), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(rpcagent_last_error(), "RPCAGENT_TRANSPORT") != NULL);
    rpcagent_config_free(cfg);
}

static void config_checks(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_OK(rpcagent_config_set_transport(cfg, "tcp"));
    CHECK_OK(rpcagent_config_set_transport(cfg, "auto"));
    CHECK_STATUS(rpcagent_config_set_transport(cfg, "shm"), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_transport(cfg, "TCP"), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_transport(cfg, ""), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_transport(cfg, NULL), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_transport(NULL, "tcp"), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_OK(rpcagent_config_set_spin_us(cfg, 0));
    CHECK_OK(rpcagent_config_set_spin_us(cfg, 1000000));
    CHECK_STATUS(rpcagent_config_set_spin_us(cfg, 1000001), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_spin_us(NULL, 5), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_OK(rpcagent_config_set_shm_ring_bytes(cfg, 4096));
    CHECK_OK(rpcagent_config_set_shm_ring_bytes(cfg, 1u << 30));
    CHECK_STATUS(rpcagent_config_set_shm_ring_bytes(cfg, 2048), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_shm_ring_bytes(cfg, 100000), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_shm_ring_bytes(cfg, 1ull << 31), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(rpcagent_config_set_shm_ring_bytes(NULL, 4096), RPCAGENT_ERR_INVALID_ARGUMENT);
    rpcagent_config_free(cfg);

    /* An in-process world: "self" and "local", no first call needed. */
    rpcagent_t *local[3];
    CHECK_OK(rpcagent_init_local(3, NULL, local));
    CHECK(strcmp(rpcagent_peer_transport(local[1], 1), "self") == 0);
    CHECK(strcmp(rpcagent_peer_transport(local[1], 2), "local") == 0);
    CHECK(rpcagent_peer_transport(local[1], 3) == NULL);
    for (int i = 0; i < 3; i++) rpcagent_free(local[i]);
}

int main(void) {
    config_checks();
    int failed = run_world("transport auto", 2, each_rank, "RANK", "WORLD_SIZE", 120);
    setenv("RPCAGENT_TRANSPORT", "tcp", 1);
    setenv("RPCAGENT_SPIN_US", "0", 1); /* callers sleep at once: same outcomes */
    failed |= run_world("transport tcp", 2, each_rank, "RANK", "WORLD_SIZE", 120);
    unsetenv("RPCAGENT_SPIN_US");
    setenv("RPCAGENT_TRANSPORT", "carrier-pigeon", 1);
    failed |= run_world("transport bad", 1, bad_env_body, "RANK", "WORLD_SIZE", 30);
    unsetenv("RPCAGENT_TRANSPORT");
    if (failed) return 1;
    printf("transport: ok\n");
    return 0;
}
