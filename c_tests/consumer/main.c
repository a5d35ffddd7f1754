/* A consumer's program: an in-process world of two ranks, one call. */
#include <stdio.h>
#include <string.h>

#include <rpcagent.h>

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

int main(void) {
    rpcagent_t *agents[2];
    if (rpcagent_init_local(2, NULL, agents) != RPCAGENT_OK) return 1;
    rpcagent_register(agents[1], "echo", echo, NULL, NULL, 0);
    rpcagent_start(agents[1]);
    rpcagent_buffer_t out;
    rpcagent_status_t s = rpcagent_call_sync(agents[0], 1, "echo", (const uint8_t *)"hello", 5,
                                             RPCAGENT_TIMEOUT_DEFAULT, &out);
    int ok = s == RPCAGENT_OK && out.len == 5 && memcmp(out.data, "hello", 5) == 0;
    rpcagent_buffer_free(&out);
    rpcagent_free(agents[0]);
    rpcagent_free(agents[1]);
    printf("consumer (rpcagent %s): %s\n", rpcagent_version(), ok ? "ok" : "FAILED");
    return ok ? 0 : 2;
}
