/* The send window: a caller's memory stays bounded when its destination
 * stops reading, calls wait for room and then complete, and a call from an
 * inline handler that finds no room fails at once with RPCAGENT_ERR_BUSY.
 *
 * Once rank 0 has opened its connection to rank 1 and said so, rank 1 stops
 * itself (SIGSTOP).
 * Rank 0 (window 1 MiB) floods it with 256 KiB calls from a helper thread
 * until a call_async waits for room; it checks that its memory grew by no
 * more than the window (plus slack), calls its own inline handler, which
 * calls rank 1 and must get BUSY, then continues rank 1: every flooded
 * call completes. */
#include <pthread.h>
#include <stdatomic.h>

#include "stopping.h"

enum { CALL = 256 << 10, WINDOW = 1 << 20, MAX_CALLS = 400 };

static rpcagent_t *agent;
static atomic_int issued;
static atomic_int waiting_for_room; /* the helper is inside call_async */
static atomic_llong entered_at_us;
static rpcagent_future_t *flood[MAX_CALLS];

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    CHECK(f != NULL);
    char line[256];
    long kib = -1;
    while (fgets(line, sizeof line, f) != NULL) {
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1) break;
    }
    fclose(f);
    return kib;
}

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len > 8 ? 8 : req->args_len);
}

/* Rank 1 stops once rank 0 says so: its connection to rank 1 is open then. */
static atomic_int may_stop;
static int32_t stop_now(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    (void)reply;
    atomic_store(&may_stop, 1);
    return 0;
}

/* Inline: runs on the I/O thread, which must never wait for room. */
static int32_t relay(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    static uint8_t big[CALL];
    rpcagent_future_t *f = NULL;
    rpcagent_status_t s = rpcagent_call_async(agent, 1, "echo", big, sizeof big, 30000, &f);
    if (s == RPCAGENT_OK) {
        s = rpcagent_future_wait(f, 0, &(rpcagent_buffer_t){0});
        rpcagent_future_free(f);
    }
    return rpcagent_reply_set(reply, (const uint8_t *)&s, sizeof s);
}

static void *flooder(void *arg) {
    (void)arg;
    static uint8_t payload[CALL];
    for (int i = 0; i < MAX_CALLS; i++) {
        atomic_store(&entered_at_us, now_us());
        atomic_store(&waiting_for_room, 1);
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", payload, sizeof payload, 60000, &flood[i]));
        atomic_store(&waiting_for_room, 0);
        atomic_store(&issued, i + 1);
    }
    return NULL;
}

static void body(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK_STATUS(rpcagent_config_set_send_window_bytes(cfg, 1000), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK_OK(rpcagent_config_from_env(cfg));
    CHECK_OK(rpcagent_config_set_send_window_bytes(cfg, WINDOW));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    uint32_t me = rpcagent_rank(agent);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "pid", note_pid, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "relay", relay, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_register(agent, "stop_now", stop_now, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));

    if (me == 1) {
        double give_up = now_ms() + 10000;
        while (atomic_load(&may_stop) == 0) {
            CHECK(now_ms() < give_up);
            usleep(1000);
        }
        report_pid_and_stop(agent);
    } else {
        /* Open the connection to rank 1 before it stops. */
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"hi", 2, 10000, &out));
        rpcagent_buffer_free(&out);
        /* Its reply may never come before rank 1 stops: not waited for. */
        rpcagent_future_t *stop = NULL;
        CHECK_OK(rpcagent_call_async(agent, 1, "stop_now", NULL, 0, 60000, &stop));
        rpcagent_future_free(stop);
        wait_until_stopped();
        long before = rss_kib();

        pthread_t helper;
        CHECK(pthread_create(&helper, NULL, flooder, NULL) == 0);
        /* Full: the helper has waited inside call_async for 500 ms. */
        double give_up = now_ms() + 30000;
        while (!(atomic_load(&waiting_for_room) && now_us() - atomic_load(&entered_at_us) > 500000)) {
            CHECK(now_ms() < give_up);
            CHECK(atomic_load(&issued) < MAX_CALLS); /* the window never filled */
            usleep(10000);
        }
        long grown = rss_kib() - before;
        printf("window full after %d calls of 256 KiB; RSS grew %ld KiB (window 1024 KiB)\n", atomic_load(&issued),
               grown);
        CHECK(grown < (WINDOW + CALL) / 1024 + 8 * 1024);

        /* An inline handler may not wait for room: BUSY at once. */
        double t0 = now_ms();
        CHECK_OK(rpcagent_call_sync(agent, 0, "relay", NULL, 0, 10000, &out));
        CHECK(out.len == sizeof(rpcagent_status_t));
        rpcagent_status_t relayed;
        memcpy(&relayed, out.data, sizeof relayed);
        rpcagent_buffer_free(&out);
        CHECK(relayed == RPCAGENT_ERR_BUSY);
        CHECK(now_ms() - t0 < 2000);

        /* Continued, rank 1 drains the window: every call completes. */
        kill(atomic_load(&stopped_pid), SIGCONT);
        CHECK(pthread_join(helper, NULL) == 0);
        for (int i = 0; i < MAX_CALLS; i++) {
            CHECK_OK(rpcagent_future_wait(flood[i], RPCAGENT_WAIT_FOREVER, &out));
            CHECK(out.len == 8);
            rpcagent_buffer_free(&out);
            rpcagent_future_free(flood[i]);
        }
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 60000));
    rpcagent_free(agent);
}

int main(void) {
    return run_world("send window", 2, body, "RANK", "WORLD_SIZE", 120);
}
