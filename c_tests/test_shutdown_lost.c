/* Graceful shutdown in a world that lost a rank: the survivors wait for each
 * other, serve each other's calls meanwhile, and then all return
 * RPCAGENT_ERR_PEER_LOST.
 *
 * World A (4 ranks): rank 0, where ranks meet at shutdown when all are
 * alive, dies after the first barrier. Rank 1 starts its graceful shutdown
 * early; rank 2 keeps calling rank 1 for a second (every call must succeed)
 * and only then shuts down; rank 3 shuts down at once. Rank 1's shutdown
 * must not return before rank 2 has reached its own.
 *
 * World B (4 ranks): rank 2 dies right after it joined, before it ever
 * called anyone, so no rank holds a connection to it: the ranks must find
 * out by themselves that it is gone (rank 0 probes it).
 *
 * A dying rank leaves with _exit: its sockets close as a SIGKILL would close
 * them, and the harness sees it exit 0. */
#include "harness.h"

#include <stdatomic.h>

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

/* When rank 1 started and ended its shutdown, and when rank 2 reached its
 * own: rank 2 tells rank 1 through "arrived". */
static _Atomic double rank2_arrives_at;

static int32_t note_arrival(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    (void)reply;
    atomic_store(&rank2_arrives_at, now_ms());
    return 0;
}

static rpcagent_t *join(void) {
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "arrived", note_arrival, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    return agent;
}

static void expect_lost_shutdown(rpcagent_t *agent, const char *who) {
    double t0 = now_ms();
    CHECK_STATUS(rpcagent_shutdown(agent, 1, 30000), RPCAGENT_ERR_PEER_LOST);
    printf("%s: graceful shutdown returned PEER_LOST after %.0f ms\n", who, now_ms() - t0);
    rpcagent_free(agent);
}

static void coordinator_dies(void) {
    rpcagent_t *agent = join();
    uint32_t me = rpcagent_rank(agent);
    CHECK_OK(rpcagent_barrier(agent, 30000));
    if (me == 0) _exit(0);
    usleep(300 * 1000);
    if (me == 1) {
        double t0 = now_ms();
        CHECK_STATUS(rpcagent_shutdown(agent, 1, 30000), RPCAGENT_ERR_PEER_LOST);
        double arrived = atomic_load(&rank2_arrives_at);
        printf("rank 1: shutdown began at 0, rank 2 arrived at %.0f ms, shutdown returned at %.0f ms\n",
               arrived - t0, now_ms() - t0);
        /* Rank 2 called for a second before it arrived; rank 1 waited. */
        CHECK(arrived > t0 + 800);
        rpcagent_free(agent);
    } else if (me == 2) {
        double t0 = now_ms();
        int calls = 0;
        while (now_ms() - t0 < 1000) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"survive", 7, 10000, &out));
            CHECK(out.len == 7 && memcmp(out.data, "survive", 7) == 0);
            rpcagent_buffer_free(&out);
            calls++;
        }
        rpcagent_buffer_t none;
        CHECK_OK(rpcagent_call_sync(agent, 1, "arrived", NULL, 0, 10000, &none));
        rpcagent_buffer_free(&none);
        printf("rank 2: %d calls to rank 1 while it shut down, all answered\n", calls);
        expect_lost_shutdown(agent, "rank 2");
    } else {
        expect_lost_shutdown(agent, "rank 3");
    }
}

static void silent_rank_dies(void) {
    rpcagent_t *agent = join();
    uint32_t me = rpcagent_rank(agent);
    if (me == 2) _exit(0);
    usleep(300 * 1000);
    if (me == 3) {
        /* Still serving: rank 1 has begun its shutdown. */
        for (int i = 0; i < 50; i++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"b", 1, 10000, &out));
            rpcagent_buffer_free(&out);
            usleep(10 * 1000);
        }
    }
    char who[32];
    snprintf(who, sizeof who, "rank %u", me);
    expect_lost_shutdown(agent, who);
}

int main(void) {
    int failed = run_world("shutdown, coordinator lost", 4, coordinator_dies, "RANK", "WORLD_SIZE", 60);
    failed |= run_world("shutdown, silent rank lost", 4, silent_rank_dies, "RANK", "WORLD_SIZE", 60);
    return failed;
}
