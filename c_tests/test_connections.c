/* Connections open in the background: a call never waits for one.
 *
 * Rank 1 stops itself (SIGSTOP) before anyone has connected to it. Rank 0's
 * first call to it must return from rpcagent_call_async at once (the kernel
 * completes the TCP connect, but nobody answers the handshake), calls to
 * rank 2 must flow meanwhile, and the stopped call must end with TIMEOUT at
 * its deadline. Then rank 1 is continued and the world shuts down. */
#include "stopping.h"

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static void body(void) {
    rpcagent_t *agent = join_from_env();
    uint32_t me = rpcagent_rank(agent);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "pid", note_pid, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));

    if (me == 1) {
        report_pid_and_stop(agent);
    } else if (me == 0) {
        wait_until_stopped();

        double t0 = now_ms();
        rpcagent_future_t *stuck = NULL;
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)"x", 1, 1500, &stuck));
        double inside = now_ms() - t0;
        /* Before, call_async connected and ran the handshake itself, and
         * waited here until the deadline. */
        CHECK(inside < 300);
        CHECK(rpcagent_future_is_ready(stuck) == 0);

        /* Other calls flow while rank 1's connection hangs in its handshake. */
        for (int i = 0; i < 20; i++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agent, 2, "echo", (const uint8_t *)"y", 1, 5000, &out));
            CHECK(out.len == 1 && out.data[0] == 'y');
            rpcagent_buffer_free(&out);
        }
        CHECK(now_ms() - t0 < 1400);
        CHECK(rpcagent_future_is_ready(stuck) == 0);

        rpcagent_buffer_t out;
        CHECK_STATUS(rpcagent_future_wait(stuck, RPCAGENT_WAIT_FOREVER, &out), RPCAGENT_ERR_TIMEOUT);
        double took = now_ms() - t0;
        CHECK(took >= 1400 && took < 3000);
        rpcagent_future_free(stuck);
        printf("call_async to a stopped rank returned in %.2f ms; it timed out after %.0f ms\n", inside, took);
        kill(atomic_load(&stopped_pid), SIGCONT);

        /* Continued, rank 1 finishes its handshake and serves again. */
        CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"z", 1, 10000, &out));
        CHECK(out.len == 1 && out.data[0] == 'z');
        rpcagent_buffer_free(&out);
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

int main(void) {
    return run_world("stopped peer", 3, body, "RANK", "WORLD_SIZE", 60);
}
