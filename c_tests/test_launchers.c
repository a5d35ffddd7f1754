/* The same binary joins worlds started the way Open MPI, Slurm and
 * MPICH/Hydra start ranks: nothing but their environment variables. */
#include "harness.h"

static const char *expect_rank_var;

static int32_t who(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    return rpcagent_reply_set(reply, (const uint8_t *)"ok", 2);
}

static char slurm_job_id[16];

/* A Slurm step sets no MASTER_*: the master is the first host of the step's
 * node list, the port comes from the job and step ids. */
static void as_slurm_step(void) {
    unsetenv("MASTER_ADDR");
    unsetenv("MASTER_PORT");
    setenv("SLURM_STEP_NODELIST", "localhost,node[02-04]", 1);
    setenv("SLURM_JOB_NODELIST", "localhost,node[02-09]", 1);
    setenv("SLURM_JOB_ID", slurm_job_id, 1);
    setenv("SLURM_STEP_ID", "0", 1);
}

/* A job id whose step 0 gets a port free now: 15000 + (job * 10) mod 10000. */
static void pick_slurm_job_id(void) {
    for (unsigned job = (unsigned)getpid() % 500 + 1; job < 100000; job += 7) {
        if (port_is_free(15000 + (int)(job % 1000) * 10)) {
            snprintf(slurm_job_id, sizeof slurm_job_id, "%u", job);
            return;
        }
    }
    CHECK(!"no free port for a Slurm step");
}

static void body(void) {
    /* torchrun's names must not be what made this work. */
    unsetenv("RANK");
    unsetenv("WORLD_SIZE");
    if (slurm_job_id[0]) {
        as_slurm_step();
    }
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
    /* Hold the default port, so that only the derived one can work. */
    pick_slurm_job_id();
    int holder = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(29500)};
    int one = 1;
    CHECK(holder >= 0 && setsockopt(holder, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    /* EADDRINUSE: someone else holds it, which serves as well. */
    int held = bind(holder, (struct sockaddr *)&any, sizeof any) == 0 && listen(holder, 1) == 0;
    CHECK(held || errno == EADDRINUSE);
    failed |= run_world("slurm, no master variables", 3, body, "SLURM_PROCID", "SLURM_NTASKS", 60);
    close(holder);
    slurm_job_id[0] = 0;
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

    /* So is a Slurm node list that is not one. */
    setenv("SLURM_NTASKS", "4", 1);
    unsetenv("MASTER_ADDR");
    unsetenv("RPCAGENT_MASTER_ADDR");
    setenv("SLURM_STEP_NODELIST", "gpu[01-04,07", 1);
    CHECK_STATUS(rpcagent_config_from_env(cfg), RPCAGENT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(rpcagent_last_error(), "SLURM_STEP_NODELIST") != NULL);
    rpcagent_config_free(cfg);
    return failed;
}
