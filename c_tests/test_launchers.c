/* The same binary joins worlds started the way Open MPI, Slurm and
 * MPICH/Hydra start ranks: nothing but their environment variables. */
#include "harness.h"

static const char *expect_rank_var;

static int32_t who(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    return rpcagent_reply_set(reply, (const uint8_t *)"ok", 2);
}

static void body(void) {
    /* torchrun's names must not be what made this work. */
    unsetenv("RANK");
    unsetenv("WORLD_SIZE");
    rpcagent_t *agent = join_from_env();
    CHECK(rpcagent_rank(agent) == (uint32_t)atoi(getenv(expect_rank_var)));
    CHECK_OK(rpcagent_register(agent, "who", who, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    for (uint32_t dst = 0; dst < rpcagent_world_size(agent); dst++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, dst, "who", NULL, 0, 10000, &out));
        CHECK(out.len == 2 && memcmp(out.data, "ok", 2) == 0);
        rpcagent_buffer_free(&out);
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

int main(void) {
    int failed = 0;
    expect_rank_var = "OMPI_COMM_WORLD_RANK";
    failed |= run_world("open-mpi", 3, body, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", 60);
    expect_rank_var = "SLURM_PROCID";
    failed |= run_world("slurm", 3, body, "SLURM_PROCID", "SLURM_NTASKS", 60);
    expect_rank_var = "PMI_RANK";
    failed |= run_world("mpich", 3, body, "PMI_RANK", "PMI_SIZE", 60);

    /* A malformed variable is an invalid argument naming it. */
    setenv("SLURM_NTASKS", "many", 1);
    unsetenv("WORLD_SIZE");
    unsetenv("OMPI_COMM_WORLD_SIZE");
    unsetenv("PMI_SIZE");
    unsetenv("RPCAGENT_WORLD_SIZE");
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK_STATUS(rpcagent_config_from_env(cfg), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(rpcagent_last_error(), "SLURM_NTASKS") != NULL);
    rpcagent_config_free(cfg);
    return failed;
}
