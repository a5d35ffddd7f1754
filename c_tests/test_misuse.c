/* Misuse never crashes: NULL handles and out-pointers, out-of-range ranks,
 * names of 0 and 300 bytes or bad UTF-8, bad timeouts and config values,
 * double frees made safe by the API. Plus the static facts of the header. */
#include "harness.h"

static int32_t nop(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    (void)reply;
    return 0;
}

int main(void) {
    const rpcagent_status_t E = RPCAGENT_ERR_INVALID_ARGUMENT;
    /* Header facts. */
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", RPCAGENT_VERSION_MAJOR, RPCAGENT_VERSION_MINOR,
             RPCAGENT_VERSION_PATCH);
    CHECK(strcmp(version, rpcagent_version()) == 0);
    CHECK(sizeof(rpcagent_status_t) == 4);
    CHECK(strcmp(rpcagent_status_str(RPCAGENT_ERR_TIMEOUT), "RPCAGENT_ERR_TIMEOUT") == 0);
    CHECK(strcmp(rpcagent_status_str(RPCAGENT_OK), "RPCAGENT_OK") == 0);
    CHECK(strcmp(rpcagent_status_str(12345), "RPCAGENT_UNKNOWN_STATUS") == 0);
    CHECK(RPCAGENT_ERR_INTERNAL == -99 && RPCAGENT_PENDING == 1 && RPCAGENT_ERR_EXISTS == -12);

    /* NULL everywhere. */
    rpcagent_buffer_t out = {0};
    rpcagent_future_t *f = NULL;
    uint32_t rank = 0;
    CHECK_STATUS(rpcagent_init(NULL, NULL), E);
    CHECK(strlen(rpcagent_last_error()) > 0);
    CHECK_STATUS(rpcagent_init_local(2, NULL, NULL), E);
    CHECK_STATUS(rpcagent_start(NULL), E);
    CHECK_STATUS(rpcagent_barrier(NULL, 10), E);
    CHECK(rpcagent_rank(NULL) == UINT32_MAX);
    CHECK(rpcagent_world_size(NULL) == 0);
    CHECK_STATUS(rpcagent_rank_of(NULL, "x", &rank), E);
    CHECK_STATUS(rpcagent_register(NULL, "x", nop, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_unregister(NULL, "x"), E);
    CHECK_STATUS(rpcagent_call_sync(NULL, 0, "x", NULL, 0, -1, &out), E);
    CHECK_STATUS(rpcagent_call_async(NULL, 0, "x", NULL, 0, -1, &f), E);
    CHECK_STATUS(rpcagent_shutdown(NULL, 1, 10), E);
    CHECK_STATUS(rpcagent_get_stats(NULL, NULL, 0), E);
    CHECK(rpcagent_future_is_ready(NULL) == 0);
    CHECK_STATUS(rpcagent_future_wait(NULL, 0, &out), E);
    CHECK(rpcagent_future_error(NULL) == NULL);
    CHECK_STATUS(rpcagent_future_wait_any(NULL, 1, 0, NULL), E);
    CHECK_STATUS(rpcagent_future_on_complete(NULL, NULL, NULL), E);
    CHECK_STATUS(rpcagent_reply_set(NULL, NULL, 0), E);
    CHECK(rpcagent_reply_alloc(NULL, 4) == NULL);
    CHECK_STATUS(rpcagent_reply_error(NULL, "x"), E);
    CHECK(rpcagent_reply_defer(NULL) == NULL);
    CHECK_STATUS(rpcagent_deferred_complete(NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_deferred_fail(NULL, "x"), E);
    CHECK_STATUS(rpcagent_config_from_env(NULL), E);
    CHECK_STATUS(rpcagent_config_set_rank(NULL, 0), E);
    CHECK_STATUS(rpcagent_config_set_name(NULL, "x"), E);
    /* Frees of NULL and double frees of buffers are no-ops. */
    rpcagent_free(NULL);
    rpcagent_future_free(NULL);
    rpcagent_config_free(NULL);
    rpcagent_buffer_free(NULL);
    rpcagent_buffer_free(&out);
    rpcagent_buffer_free(&out);

    /* Bad config values. */
    rpcagent_config_t *cfg = rpcagent_config_new();
    char long_name[301];
    memset(long_name, 'n', 300);
    long_name[300] = 0;
    const char bad_utf8[] = {(char)0xff, (char)0xfe, 0};
    CHECK_STATUS(rpcagent_config_set_world_size(cfg, 0), E);
    CHECK_STATUS(rpcagent_config_set_worker_threads(cfg, 0), E);
    CHECK_STATUS(rpcagent_config_set_max_message_bytes(cfg, 0), E);
    CHECK_STATUS(rpcagent_config_set_name(cfg, ""), E);
    CHECK_STATUS(rpcagent_config_set_name(cfg, long_name), E);
    CHECK_STATUS(rpcagent_config_set_name(cfg, bad_utf8), E);
    CHECK_STATUS(rpcagent_config_set_name(cfg, NULL), E);
    CHECK_STATUS(rpcagent_config_set_master(cfg, NULL, 1), E);
    CHECK_STATUS(rpcagent_config_set_master(cfg, "host", 0), E);
    CHECK_STATUS(rpcagent_config_set_bind(cfg, ""), E);
    CHECK_STATUS(rpcagent_config_set_peer_timeout_ms(cfg, 10), E);
    CHECK_OK(rpcagent_config_set_peer_timeout_ms(cfg, 5000));
    CHECK_STATUS(rpcagent_config_set_secret(cfg, NULL, 5), E);
    CHECK_OK(rpcagent_config_set_secret(cfg, NULL, 0));
    CHECK_OK(rpcagent_config_set_world_size(cfg, 2));
    CHECK_OK(rpcagent_config_set_rank(cfg, 2)); /* caught at init */
    rpcagent_t *agent = NULL;
    CHECK_STATUS(rpcagent_init(cfg, &agent), E);
    CHECK(agent == NULL);
    CHECK(strstr(rpcagent_last_error(), "rank 2") != NULL);
    CHECK_STATUS(rpcagent_init(cfg, NULL), E);
    rpcagent_config_free(cfg);

    rpcagent_t *agents[2];
    CHECK_STATUS(rpcagent_init_local(0, NULL, agents), E);
    CHECK_OK(rpcagent_init_local(2, NULL, agents));
    rpcagent_t *a = agents[0];
    CHECK_OK(rpcagent_start(agents[1]));

    /* Names. */
    CHECK_STATUS(rpcagent_register(a, "", nop, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_register(a, long_name, nop, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_register(a, bad_utf8, nop, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_register(a, NULL, nop, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_register(a, "f", NULL, NULL, NULL, 0), E);
    CHECK_STATUS(rpcagent_register(a, "f", nop, NULL, NULL, 0x80), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, "", NULL, 0, -1, &out), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, long_name, NULL, 0, -1, &out), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, bad_utf8, NULL, 0, -1, &out), E);
    CHECK_STATUS(rpcagent_rank_of(a, "nobody", &rank), RPCAGENT_ERR_NOT_FOUND);
    CHECK_STATUS(rpcagent_rank_of(a, "worker1", NULL), E);
    CHECK_OK(rpcagent_rank_of(a, "worker1", &rank));
    CHECK(rank == 1);

    /* Ranks, timeouts, pointers. */
    CHECK_STATUS(rpcagent_call_sync(a, 2, "f", NULL, 0, -1, &out), E);
    CHECK(strstr(rpcagent_last_error(), "rank 2") != NULL);
    CHECK_STATUS(rpcagent_call_sync(a, UINT32_MAX, "f", NULL, 0, -1, &out), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, "f", NULL, 0, -5, &out), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, "f", NULL, 3, -1, &out), E);
    CHECK_STATUS(rpcagent_call_sync(a, 1, "f", NULL, 0, -1, NULL), E);
    f = (rpcagent_future_t *)&out;
    CHECK_STATUS(rpcagent_call_async(a, 7, "f", NULL, 0, -1, &f), E);
    CHECK(f == NULL);
    CHECK_STATUS(rpcagent_call_async(a, 1, "f", NULL, 0, -1, NULL), E);
    rpcagent_stats_t stats;
    CHECK_STATUS(rpcagent_get_stats(a, NULL, sizeof stats), E);
    CHECK_STATUS(rpcagent_get_stats(a, &stats, 0), E);
    /* An older caller that knows only the first two fields gets those. */
    uint64_t first_two[3] = {0, 0, 0xdead};
    CHECK_OK(rpcagent_get_stats(a, (rpcagent_stats_t *)first_two, 2 * sizeof(uint64_t)));
    CHECK(first_two[2] == 0xdead);
    CHECK_STATUS(rpcagent_set_log_level(9), E);
    size_t idx;
    CHECK_STATUS(rpcagent_future_wait_any(NULL, 0, 0, &idx), E);
    /* A NULL entry is INVALID_ARGUMENT: on a first call over an array, and
     * on a later call that reaches it (here: the entry it just answered). */
    rpcagent_future_t *arr[2] = {NULL, NULL};
    CHECK_OK(rpcagent_call_async(a, 1, "f", NULL, 0, -1, &arr[0]));
    CHECK_OK(rpcagent_call_async(a, 1, "f", NULL, 0, -1, &arr[1]));
    rpcagent_future_t *with_null[3] = {arr[0], NULL, arr[1]};
    CHECK_STATUS(rpcagent_future_wait_any(with_null, 3, 1000, &idx), E);
    CHECK_OK(rpcagent_future_wait_any(arr, 2, 5000, &idx));
    CHECK(idx < 2);
    rpcagent_future_t *answered = arr[idx];
    arr[idx] = NULL;
    CHECK_STATUS(rpcagent_future_wait_any(arr, 2, 5000, &idx), E);
    rpcagent_future_free(answered);
    rpcagent_future_free(arr[0]);
    rpcagent_future_free(arr[1]);

    /* Unknown function on a live peer is NOT_FOUND, not a crash. */
    CHECK_STATUS(rpcagent_call_sync(a, 1, "f", NULL, 0, -1, &out), RPCAGENT_ERR_NOT_FOUND);

    CHECK_OK(rpcagent_shutdown(a, 0, 100));
    CHECK_OK(rpcagent_shutdown(a, 0, 100)); /* twice is fine */
    CHECK_STATUS(rpcagent_start(a), RPCAGENT_ERR_SHUTDOWN);
    rpcagent_free(agents[0]);
    rpcagent_free(agents[1]);
    printf("misuse: ok\n");
    return 0;
}
