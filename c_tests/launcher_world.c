/* Started by a launcher (Open MPI's mpirun or Slurm's srun) with nothing but
 * its environment: every rank calls every rank, and the rank the library
 * chose is the one the launcher gave. */
#include "harness.h"

static int32_t whoami(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)req;
    uint32_t me = *(uint32_t *)u;
    return rpcagent_reply_set(reply, (const uint8_t *)&me, sizeof me);
}

int main(void) {
    /* Open MPI first, as the library reads them: an mpirun inside a Slurm
     * job also inherits the job's SLURM_PROCID. */
    const char *rank_var = "OMPI_COMM_WORLD_RANK", *size_var = "OMPI_COMM_WORLD_SIZE";
    if (getenv(rank_var) == NULL) {
        rank_var = "SLURM_PROCID";
        size_var = "SLURM_NTASKS";
    }
    CHECK(getenv(rank_var) != NULL && getenv(size_var) != NULL);
    rpcagent_t *agent = join_from_env();
    uint32_t me = rpcagent_rank(agent), n = rpcagent_world_size(agent);
    CHECK(me == (uint32_t)atoi(getenv(rank_var)));
    CHECK(n == (uint32_t)atoi(getenv(size_var)));
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
    printf("launcher rank %u of %u: called every rank\n", me, n);
    return 0;
}
