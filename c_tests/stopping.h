/* For tests in which a rank stops itself (SIGSTOP) so that rank 0 can see
 * what a destination that reads nothing does to its callers. */
#ifndef RPCAGENT_TEST_STOPPING_H
#define RPCAGENT_TEST_STOPPING_H

#include <stdatomic.h>

#include "harness.h"

/* The pid of the rank that will stop, as it reported it to rank 0. */
static atomic_int stopped_pid;

/* Rank 0's "pid" handler: records the caller's pid. */
static int32_t note_pid(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)reply;
    int pid = 0;
    if (req->args_len != sizeof pid) return 1;
    memcpy(&pid, req->args, sizeof pid);
    atomic_store(&stopped_pid, pid);
    return 0;
}

/* The stopping rank: tells rank 0 its pid (opening its own connection to
 * rank 0, none from rank 0 to it), then stops until continued. */
static inline void report_pid_and_stop(rpcagent_t *agent) {
    int pid = getpid();
    rpcagent_buffer_t none;
    CHECK_OK(rpcagent_call_sync(agent, 0, "pid", (const uint8_t *)&pid, sizeof pid, 10000, &none));
    rpcagent_buffer_free(&none);
    raise(SIGSTOP);
}

/* Whether process `pid` is stopped, from /proc/<pid>/stat's state field. */
static inline int is_stopped(int pid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    const char *close_paren = strrchr(line, ')');
    return close_paren != NULL && (close_paren[2] == 'T' || close_paren[2] == 't');
}

/* Rank 0: waits (at most 10 s) until the reporting rank has stopped. */
static inline void wait_until_stopped(void) {
    double give_up = now_ms() + 10000;
    while (atomic_load(&stopped_pid) == 0 || !is_stopped(atomic_load(&stopped_pid))) {
        CHECK(now_ms() < give_up);
        usleep(10000);
    }
}

#endif
