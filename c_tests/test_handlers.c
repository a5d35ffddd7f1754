/* Handler features across processes: deferred replies completed from
 * another thread (and from inside the handler), a one-worker rank answering
 * two callers through deferral, nested calls 0 -> 1 -> 2, inline handlers,
 * requests sent before the destination started. */
#include <pthread.h>

#include "harness.h"

static rpcagent_t *agent;

/* Defers, then a fresh thread answers 50 ms later. */
struct later { rpcagent_deferred_t *d; uint8_t value; };
static void *answer_later(void *p) {
    struct later *l = p;
    usleep(50 * 1000);
    uint8_t v = l->value + 1;
    CHECK_OK(rpcagent_deferred_complete(l->d, &v, 1));
    free(l);
    return NULL;
}
static int32_t deferred_from_thread(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    struct later *l = malloc(sizeof *l);
    l->d = rpcagent_reply_defer(reply);
    CHECK(l->d != NULL);
    CHECK(rpcagent_reply_defer(reply) == NULL); /* only once */
    CHECK_STATUS(rpcagent_reply_set(reply, NULL, 0), RPCAGENT_ERR_INVALID_ARGUMENT);
    l->value = req->args_len ? req->args[0] : 0;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, answer_later, l) == 0);
    pthread_detach(t);
    return 0;
}

static int32_t deferred_inside(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
    CHECK_OK(rpcagent_deferred_fail(d, "refused inside the handler"));
    return 0;
}

/* Rank 0 runs with one worker: "pair" holds the first caller until the
 * second arrives, then answers both with the sum. */
static pthread_mutex_t pair_lock = PTHREAD_MUTEX_INITIALIZER;
static rpcagent_deferred_t *pair_waiting;
static uint8_t pair_value;
static int32_t pair(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
    pthread_mutex_lock(&pair_lock);
    if (pair_waiting == NULL) {
        pair_waiting = d;
        pair_value = req->args[0];
        pthread_mutex_unlock(&pair_lock);
        return 0;
    }
    uint8_t sum = pair_value + req->args[0];
    rpcagent_deferred_t *first = pair_waiting;
    pair_waiting = NULL;
    pthread_mutex_unlock(&pair_lock);
    CHECK_OK(rpcagent_deferred_complete(first, &sum, 1));
    CHECK_OK(rpcagent_deferred_complete(d, &sum, 1));
    return 0;
}

static int32_t relay(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    char next[64];
    int len = snprintf(next, sizeof next, "%.*s-relay", (int)req->args_len, (const char *)req->args);
    rpcagent_buffer_t out;
    rpcagent_status_t s = rpcagent_call_sync(agent, 2, "leaf", (const uint8_t *)next, (size_t)len, 5000, &out);
    if (s != RPCAGENT_OK) {
        rpcagent_reply_error(reply, rpcagent_last_error());
        return 1;
    }
    rpcagent_reply_set(reply, out.data, out.len);
    rpcagent_buffer_free(&out);
    return 0;
}

static int32_t leaf(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    char out[96];
    int len = snprintf(out, sizeof out, "%.*s-leaf", (int)req->args_len, (const char *)req->args);
    return rpcagent_reply_set(reply, (const uint8_t *)out, (size_t)len);
}

static int32_t whoami(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    uint8_t who[2] = {(uint8_t)req->src_rank, (uint8_t)strcmp(req->function, "whoami")};
    return rpcagent_reply_set(reply, who, 2);
}

static void body(void) {
    /* Configured by hand this time, from what the launcher said. */
    rpcagent_config_t *cfg = rpcagent_config_new();
    int my_rank = atoi(getenv("RANK"));
    char name[16];
    snprintf(name, sizeof name, "node-%d", my_rank);
    CHECK_OK(rpcagent_config_set_rank(cfg, (uint32_t)my_rank));
    CHECK_OK(rpcagent_config_set_world_size(cfg, (uint32_t)atoi(getenv("WORLD_SIZE"))));
    CHECK_OK(rpcagent_config_set_master(cfg, "127.0.0.1", (uint16_t)atoi(getenv("MASTER_PORT"))));
    CHECK_OK(rpcagent_config_set_bind(cfg, "127.0.0.1"));
    CHECK_OK(rpcagent_config_set_name(cfg, name));
    CHECK_OK(rpcagent_config_set_call_timeout_ms(cfg, 20000));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    CHECK_OK(rpcagent_config_set_max_message_bytes(cfg, 1 << 20));
    CHECK_OK(rpcagent_config_set_worker_threads(cfg, 1));
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    uint32_t me = rpcagent_rank(agent), found = 99;
    CHECK(me == (uint32_t)my_rank);
    CHECK_OK(rpcagent_rank_of(agent, "node-2", &found));
    CHECK(found == 2);
    CHECK_STATUS(rpcagent_rank_of(agent, "worker2", &found), RPCAGENT_ERR_NOT_FOUND);
    CHECK_OK(rpcagent_register(agent, "later", deferred_from_thread, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "inside", deferred_inside, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "pair", pair, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "relay", relay, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "leaf", leaf, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "whoami", whoami, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    if (me == 2) usleep(400 * 1000); /* rank 2 starts late */
    CHECK_OK(rpcagent_start(agent));

    rpcagent_buffer_t out;
    if (me == 0) {
        /* Sent before rank 2 started: waits there and is served. */
        CHECK_OK(rpcagent_call_sync(agent, 2, "whoami", NULL, 0, 10000, &out));
        CHECK(out.len == 2 && out.data[0] == 0 && out.data[1] == 0);
        rpcagent_buffer_free(&out);

        uint8_t v = 41;
        CHECK_OK(rpcagent_call_sync(agent, 1, "later", &v, 1, 10000, &out));
        CHECK(out.len == 1 && out.data[0] == 42);
        rpcagent_buffer_free(&out);

        CHECK_STATUS(rpcagent_call_sync(agent, 1, "inside", NULL, 0, 10000, &out), RPCAGENT_ERR_HANDLER);
        CHECK(strstr(rpcagent_last_error(), "refused inside the handler") != NULL);

        CHECK_OK(rpcagent_call_sync(agent, 1, "relay", (const uint8_t *)"root", 4, 10000, &out));
        CHECK(out.len == strlen("root-relay-leaf") && memcmp(out.data, "root-relay-leaf", out.len) == 0);
        rpcagent_buffer_free(&out);
    } else {
        /* Ranks 1 and 2 call rank 0's one-worker "pair" at the same time. */
        CHECK_OK(rpcagent_barrier(agent, 30000));
        uint8_t v = (uint8_t)(me * 10);
        CHECK_OK(rpcagent_call_sync(agent, 0, "pair", &v, 1, 10000, &out));
        CHECK(out.len == 1 && out.data[0] == 30);
        rpcagent_buffer_free(&out);
    }
    if (me == 0) CHECK_OK(rpcagent_barrier(agent, 30000));
    CHECK_OK(rpcagent_barrier(agent, 30000));
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

int main(void) { return run_world("handlers", 3, body, "RANK", "WORLD_SIZE", 120); }
