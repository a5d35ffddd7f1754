/* The in-process world (rpcagent_init_local): calls, user data released
 * exactly once (at unregister, or at free and not before), the log callback
 * and level, reply size limits. */
#include <stdatomic.h>

#include "harness.h"

static atomic_int released[3];
static void release(void *p) { atomic_fetch_add((atomic_int *)p, 1); }

static int32_t add_one(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    uint8_t *out = rpcagent_reply_alloc(reply, req->args_len);
    for (size_t i = 0; i < req->args_len; i++) out[i] = req->args[i] + 1;
    return 0;
}

static int32_t too_big(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    return rpcagent_reply_alloc(reply, 2048) != NULL ? 0 : 1;
}

static atomic_int log_lines, saw_shutdown, saw_join;
static void on_log(void *user_data, int32_t level, const char *message) {
    CHECK(user_data == (void *)&log_lines);
    CHECK(level >= RPCAGENT_LOG_ERROR && level <= RPCAGENT_LOG_DEBUG);
    atomic_fetch_add(&log_lines, 1);
    if (strstr(message, "shut down") != NULL) atomic_fetch_add(&saw_shutdown, 1);
    if (strstr(message, "joined") != NULL && strstr(message, "[rpcagent rank") != NULL) atomic_fetch_add(&saw_join, 1);
}

int main(void) {
    CHECK_OK(rpcagent_set_log_callback(on_log, &log_lines));
    CHECK_OK(rpcagent_set_log_level(RPCAGENT_LOG_INFO));

    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK_OK(rpcagent_config_set_max_message_bytes(cfg, 1024));
    CHECK_OK(rpcagent_config_set_worker_threads(cfg, 2));
    rpcagent_t *agents[3] = {0};
    CHECK_OK(rpcagent_init_local(3, cfg, agents));
    rpcagent_config_free(cfg);
    for (int r = 0; r < 3; r++) {
        CHECK(rpcagent_rank(agents[r]) == (uint32_t)r);
        CHECK(rpcagent_world_size(agents[r]) == 3);
        CHECK_OK(rpcagent_register(agents[r], "add_one", add_one, &released[r], release, 0));
        CHECK_OK(rpcagent_register(agents[r], "too_big", too_big, NULL, NULL, 0));
        CHECK_STATUS(rpcagent_register(agents[r], "add_one", add_one, &released[r], release, 0),
                     RPCAGENT_ERR_EXISTS);
        CHECK_OK(rpcagent_start(agents[r]));
    }
    CHECK(atomic_load(&released[0]) == 0); /* a failed register keeps the caller's data */

    for (int src = 0; src < 3; src++)
        for (uint32_t dst = 0; dst < 3; dst++) {
            uint8_t args[3] = {1, 2, (uint8_t)dst};
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agents[src], dst, "add_one", args, 3, -1, &out));
            CHECK(out.len == 3 && out.data[0] == 2 && out.data[1] == 3 && out.data[2] == dst + 1);
            rpcagent_buffer_free(&out);
        }

    uint8_t big[2048] = {0};
    rpcagent_buffer_t out;
    CHECK_STATUS(rpcagent_call_sync(agents[0], 1, "add_one", big, sizeof big, -1, &out), RPCAGENT_ERR_TOO_LARGE);
    CHECK_STATUS(rpcagent_call_sync(agents[0], 1, "too_big", NULL, 0, -1, &out), RPCAGENT_ERR_TOO_LARGE);
    CHECK(strstr(rpcagent_last_error(), "reply") != NULL);

    /* Unregister releases that rank's user data once; free releases the rest. */
    CHECK_OK(rpcagent_unregister(agents[1], "add_one"));
    CHECK(atomic_load(&released[1]) == 1);
    CHECK_STATUS(rpcagent_call_sync(agents[0], 1, "add_one", big, 1, -1, &out), RPCAGENT_ERR_NOT_FOUND);
    CHECK_STATUS(rpcagent_unregister(agents[1], "add_one"), RPCAGENT_ERR_NOT_FOUND);

    /* Shutdown is not free: user data stays until rpcagent_free. */
    CHECK_OK(rpcagent_shutdown(agents[0], 0, 1000));
    CHECK(atomic_load(&released[0]) == 0);
    for (int r = 0; r < 3; r++) rpcagent_free(agents[r]);
    for (int r = 0; r < 3; r++) CHECK(atomic_load(&released[r]) == 1);
    CHECK(atomic_load(&saw_shutdown) >= 1);
    CHECK(atomic_load(&saw_join) == 3); /* info: each rank says it joined, prefixed with its rank */
    CHECK(atomic_load(&log_lines) >= 1);

    CHECK_OK(rpcagent_set_log_callback(NULL, NULL));
    CHECK_OK(rpcagent_set_log_level(RPCAGENT_LOG_WARN));
    printf("local world: ok\n");
    return 0;
}
