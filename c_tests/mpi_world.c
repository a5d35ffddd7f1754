/* Started by mpirun with nothing but its environment: every rank calls
 * every rank. */
#include "harness.h"

static int32_t whoami(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    uint32_t me = *(uint32_t *)u;
    return rpcagent_reply_set(reply, (const uint8_t *)&me, sizeof me);
}

int main(void) {
    CHECK(getenv("OMPI_COMM_WORLD_RANK") != NULL);
    rpcagent_t *agent = join_from_env();
    uint32_t me = rpcagent_rank(agent), n = rpcagent_world_size(agent);
    CHECK(me == (uint32_t)atoi(getenv("OMPI_COMM_WORLD_RANK")));
    CHECK(n == (uint32_t)atoi(getenv("OMPI_COMM_WORLD_SIZE")));
    CHECK_OK(rpcagent_register(agent, "whoami", whoami, &me, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    for (uint32_t dst = 0; dst < n; dst++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, dst, "whoami", NULL, 0, 10000, &out));
        CHECK(out.len == sizeof(uint32_t) && *(uint32_t *)out.data == dst);
        rpcagent_buffer_free(&out);
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
    printf("mpi rank %u of %u: called every rank\n", me, n);
    return 0;
}
