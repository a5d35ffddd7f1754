/* Test helpers for the C tests: checks that report the library's own error
 * text, and a launcher that runs a world of N ranks as N forked processes. */
#ifndef RPCAGENT_TEST_HARNESS_H
#define RPCAGENT_TEST_HARNESS_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rpcagent.h"

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, rpcagent_last_error());                                         \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define CHECK_STATUS(expr, want)                                                            \
    do {                                                                                    \
        rpcagent_status_t got_ = (expr);                                                    \
        if (got_ != (want)) {                                                               \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: %s)\n", __FILE__, \
                    __LINE__, #expr, rpcagent_status_str(got_), rpcagent_status_str(want),  \
                    rpcagent_last_error());                                                 \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

#define CHECK_OK(expr) CHECK_STATUS(expr, RPCAGENT_OK)

static inline double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Under valgrind the big payloads would take minutes: RPCAGENT_TEST_SMALL
 * caps them. */
static inline size_t max_payload(void) {
    return getenv("RPCAGENT_TEST_SMALL") ? (size_t)1 << 20 : (size_t)64 << 20;
}

/* Whether a loopback port can be bound right now. */
static inline int port_is_free(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((unsigned short)port);
    if (fd < 0) {
        perror("port_is_free");
        exit(1);
    }
    int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* A port that was free a moment ago. It is taken below the kernel's
 * ephemeral range (32768 and up by default), where the ranks' own listeners
 * get their ports: asking the kernel for one (port 0) could hand out a port
 * a rank then took before rank 0 bound it for the rendezvous. */
static inline int free_port(void) {
    static unsigned next = 0;
    unsigned start = (unsigned)getpid() % 97 * 120;
    for (int tries = 0; tries < 12000; tries++) {
        int port = 20000 + (int)((start + next++) % 12000);
        if (port_is_free(port)) {
            return port;
        }
    }
    fprintf(stderr, "free_port: no free port between 20000 and 31999\n");
    exit(1);
}

typedef void (*rank_body)(void);

/* Runs `body` in `n` forked processes that see the launcher variables
 * rank_var/size_var (e.g. "RANK"/"WORLD_SIZE" as torchrun sets them) plus
 * MASTER_ADDR/MASTER_PORT. Returns 0 when every rank exits 0 within
 * `timeout_s`; kills the rest otherwise. */
static inline int run_world(const char *name, int n, rank_body body, const char *rank_var,
                            const char *size_var, int timeout_s) {
    char port[16], value[16];
    snprintf(port, sizeof port, "%d", free_port());
    pid_t pids[64];
    int failed = 0;
    fflush(NULL);
    for (int r = 0; r < n; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            exit(1);
        }
        if (pid == 0) {
            snprintf(value, sizeof value, "%d", r);
            setenv(rank_var, value, 1);
            snprintf(value, sizeof value, "%d", n);
            setenv(size_var, value, 1);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            setenv("MASTER_PORT", port, 1);
            body();
            fflush(NULL);
            _exit(0);
        }
        pids[r] = pid;
    }
    double deadline = now_ms() + timeout_s * 1000.0;
    int left = n;
    while (left > 0) {
        for (int r = 0; r < n; r++) {
            if (pids[r] == 0) continue;
            int status;
            pid_t done = waitpid(pids[r], &status, WNOHANG);
            if (done == pids[r]) {
                if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                    fprintf(stderr, "[%s] rank %d failed (status %d)\n", name, r, status);
                    failed = 1;
                    deadline = now_ms() + 3000.0 < deadline ? now_ms() + 3000.0 : deadline;
                }
                pids[r] = 0;
                left--;
            } else if (now_ms() > deadline) {
                fprintf(stderr, "[%s] rank %d did not finish in time; killed\n", name, r);
                kill(pids[r], SIGKILL);
                waitpid(pids[r], &status, 0);
                pids[r] = 0;
                left--;
                failed = 1;
            }
        }
        usleep(5000);
    }
    printf("[%s] world of %d processes: %s\n", name, n, failed ? "FAILED" : "ok");
    return failed;
}

/* Joins the world the launcher variables describe. */
static inline rpcagent_t *join_from_env(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_OK(rpcagent_config_from_env(cfg));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    rpcagent_t *agent = NULL;
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    return agent;
}

static inline void fill_pattern(uint8_t *p, size_t n, unsigned seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)x;
    }
}

#endif
