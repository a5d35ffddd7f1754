/* A parameter server and its trainers: logistic regression on synthetic data.
 *
 * Rank 0 holds the weights; ranks 1..N train on their own shard. Each step a
 * trainer pushes its gradient with an async call; the server holds every
 * push (deferred reply, no thread held) until all trainers of that step have
 * pushed, applies the averaged update once, and answers them all with the new
 * weights (torch's batch-updating parameter server, in C).
 *
 * Run it under any launcher (torchrun, srun, mpirun: it reads their
 * variables). Without one it starts a world of its own on this host:
 * 1 server + 3 trainers (`--trainers N` to change), loopback, no settings.
 *
 *   ps_demo [--trainers N] [--epochs E] [--target LOSS]
 *
 * Exits 0 when the final loss is at or below the target (default 0.20; the
 * loss starts at ln 2 = 0.693 with the weights at zero). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rpcagent.h"

enum { DIM = 16, SAMPLES_PER_TRAINER = 4000, BATCH = 200, MAX_TRAINERS = 64 };
static const double LEARNING_RATE = 0.5;
static const uint64_t SEED = 20261126;

static int epochs = 12;
static double target = 0.20;

#define CHECK(expr)                                                                          \
    do {                                                                                     \
        rpcagent_status_t s_ = (expr);                                                       \
        if (s_ != RPCAGENT_OK) {                                                             \
            fprintf(stderr, "%s failed: %s: %s\n", #expr, rpcagent_status_str(s_), rpcagent_last_error()); \
            exit(2);                                                                         \
        }                                                                                    \
    } while (0)

/* ---- deterministic data ---- */

static uint64_t next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double uniform(uint64_t *s) { return (next(s) >> 11) * (1.0 / 9007199254740992.0); }
static double gaussian(uint64_t *s) {
    double u = uniform(s) + 1e-12, v = uniform(s);
    return sqrt(-2.0 * log(u)) * cos(2.0 * 3.14159265358979 * v);
}
static double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

/* The true model all data comes from. */
static void true_weights(double *w) {
    uint64_t s = SEED;
    for (int j = 0; j < DIM; j++) w[j] = gaussian(&s);
}

/* Trainer `t`'s shard: features and noisy labels. */
static void make_shard(int t, double *x, double *y) {
    double w[DIM];
    true_weights(w);
    uint64_t s = SEED + 1000003ull * (uint64_t)(t + 1);
    for (int i = 0; i < SAMPLES_PER_TRAINER; i++) {
        double z = 0;
        for (int j = 0; j < DIM; j++) {
            x[i * DIM + j] = gaussian(&s);
            z += w[j] * x[i * DIM + j];
        }
        y[i] = uniform(&s) < sigmoid(2.0 * z) ? 1.0 : 0.0;
    }
}

static double loss_of(const double *w, const double *x, const double *y, int n) {
    double total = 0;
    for (int i = 0; i < n; i++) {
        double z = 0;
        for (int j = 0; j < DIM; j++) z += w[j] * x[i * DIM + j];
        double p = sigmoid(z);
        total -= y[i] * log(p + 1e-12) + (1 - y[i]) * log(1 - p + 1e-12);
    }
    return total / n;
}

/* ---- the parameter server (rank 0) ---- */

struct server {
    pthread_mutex_t lock;
    int trainers;
    double w[DIM];
    double grad_sum[DIM];
    int pushed;
    rpcagent_deferred_t *waiting[MAX_TRAINERS];
    double loss_sum;
    int losses, epoch;
    double final_loss;
};

static int32_t get_weights(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)req;
    struct server *s = user_data;
    pthread_mutex_lock(&s->lock);
    rpcagent_status_t st = rpcagent_reply_set(reply, (const uint8_t *)s->w, sizeof s->w);
    pthread_mutex_unlock(&s->lock);
    return st == RPCAGENT_OK ? 0 : 1;
}

/* Holds each push until every trainer has pushed for this step. */
static int32_t push_gradient(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    struct server *s = user_data;
    if (req->args_len != sizeof(double) * DIM) {
        rpcagent_reply_error(reply, "a gradient is 16 doubles");
        return 1;
    }
    const double *g = (const double *)req->args;
    rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
    pthread_mutex_lock(&s->lock);
    for (int j = 0; j < DIM; j++) s->grad_sum[j] += g[j];
    s->waiting[s->pushed++] = d;
    if (s->pushed == s->trainers) {
        for (int j = 0; j < DIM; j++) {
            s->w[j] -= LEARNING_RATE * s->grad_sum[j] / s->trainers;
            s->grad_sum[j] = 0;
        }
        for (int i = 0; i < s->pushed; i++)
            rpcagent_deferred_complete(s->waiting[i], (const uint8_t *)s->w, sizeof s->w);
        s->pushed = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int32_t report_loss(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)reply;
    struct server *s = user_data;
    double loss;
    memcpy(&loss, req->args, sizeof loss);
    pthread_mutex_lock(&s->lock);
    s->loss_sum += loss;
    if (++s->losses == s->trainers) {
        double mean = s->loss_sum / s->trainers;
        printf("epoch %2d  loss %.4f\n", ++s->epoch, mean);
        fflush(stdout);
        s->final_loss = mean;
        s->loss_sum = 0;
        s->losses = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* ---- a trainer (ranks 1..N) ---- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void train(rpcagent_t *agent, int trainer) {
    double *x = malloc(sizeof(double) * DIM * SAMPLES_PER_TRAINER);
    double *y = malloc(sizeof(double) * SAMPLES_PER_TRAINER);
    make_shard(trainer, x, y);
    double w[DIM];
    rpcagent_buffer_t out;

    /* Pull the initial weights (async, as every exchange here). */
    rpcagent_future_t *f = NULL;
    CHECK(rpcagent_call_async(agent, 0, "get_weights", NULL, 0, RPCAGENT_TIMEOUT_DEFAULT, &f));
    CHECK(rpcagent_future_wait(f, RPCAGENT_WAIT_FOREVER, &out));
    memcpy(w, out.data, sizeof w);
    rpcagent_buffer_free(&out);
    rpcagent_future_free(f);

    int steps = SAMPLES_PER_TRAINER / BATCH;
    double *latency = malloc(sizeof(double) * (size_t)steps * (size_t)epochs);
    int calls = 0;
    for (int e = 0; e < epochs; e++) {
        for (int step = 0; step < steps; step++) {
            double g[DIM] = {0};
            for (int i = step * BATCH; i < (step + 1) * BATCH; i++) {
                double z = 0;
                for (int j = 0; j < DIM; j++) z += w[j] * x[i * DIM + j];
                double err = sigmoid(z) - y[i];
                for (int j = 0; j < DIM; j++) g[j] += err * x[i * DIM + j] / BATCH;
            }
            double t0 = now_us();
            CHECK(rpcagent_call_async(agent, 0, "push_gradient", (const uint8_t *)g, sizeof g,
                                      RPCAGENT_TIMEOUT_DEFAULT, &f));
            CHECK(rpcagent_future_wait(f, RPCAGENT_WAIT_FOREVER, &out));
            latency[calls++] = now_us() - t0;
            memcpy(w, out.data, sizeof w);
            rpcagent_buffer_free(&out);
            rpcagent_future_free(f);
        }
        double loss = loss_of(w, x, y, SAMPLES_PER_TRAINER);
        CHECK(rpcagent_call_sync(agent, 0, "report_loss", (const uint8_t *)&loss, sizeof loss,
                                 RPCAGENT_TIMEOUT_DEFAULT, &out));
        rpcagent_buffer_free(&out);
    }
    qsort(latency, (size_t)calls, sizeof(double), cmp_double);
    rpcagent_stats_t st;
    CHECK(rpcagent_get_stats(agent, &st, sizeof st));
    printf("trainer %d: %llu calls (%llu failed), %llu bytes out, %llu in; "
           "push+pull latency p50 %.0f us, p99 %.0f us (waits for the slowest trainer)\n",
           trainer, (unsigned long long)st.calls_started, (unsigned long long)(st.calls_failed + st.calls_timed_out),
           (unsigned long long)st.bytes_sent, (unsigned long long)st.bytes_received, latency[calls / 2],
           latency[calls * 99 / 100]);
    fflush(stdout);
    free(latency);
    free(x);
    free(y);
}

/* ---- one rank ---- */

static int run_rank(void) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(rpcagent_config_from_env(cfg));
    rpcagent_t *agent = NULL;
    CHECK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    uint32_t rank = rpcagent_rank(agent), world = rpcagent_world_size(agent);
    if (world < 2 || world - 1 > MAX_TRAINERS) {
        fprintf(stderr, "ps_demo needs 1 server and 1 to %d trainers (world of %u)\n", MAX_TRAINERS, world);
        return 2;
    }
    static struct server server = {.lock = PTHREAD_MUTEX_INITIALIZER};
    int status = 0;
    if (rank == 0) {
        server.trainers = (int)world - 1;
        CHECK(rpcagent_register(agent, "get_weights", get_weights, &server, NULL, 0));
        CHECK(rpcagent_register(agent, "push_gradient", push_gradient, &server, NULL, 0));
        CHECK(rpcagent_register(agent, "report_loss", report_loss, &server, NULL, 0));
        printf("parameter server: %u trainers, %d epochs, logistic regression on %d features\n", world - 1,
               epochs, DIM);
        fflush(stdout);
    }
    CHECK(rpcagent_start(agent));
    CHECK(rpcagent_barrier(agent, 60000));
    if (rank != 0) train(agent, (int)rank);
    CHECK(rpcagent_barrier(agent, RPCAGENT_WAIT_FOREVER));
    if (rank == 0) {
        int reached = server.final_loss <= target;
        printf("final loss: %.4f (target %.2f): %s\n", server.final_loss, target, reached ? "reached" : "NOT reached");
        rpcagent_stats_t st;
        CHECK(rpcagent_get_stats(agent, &st, sizeof st));
        printf("server: %llu requests served, %llu bytes in, %llu bytes out\n",
               (unsigned long long)st.requests_served, (unsigned long long)st.bytes_received,
               (unsigned long long)st.bytes_sent);
        const char *functions[] = {"get_weights", "push_gradient", "report_loss"};
        for (size_t i = 0; i < sizeof functions / sizeof functions[0]; i++) {
            rpcagent_function_stats_t fs;
            CHECK(rpcagent_get_function_stats(agent, functions[i], &fs, sizeof fs));
            printf("  %-13s %6llu served, %llu failed, %llu cancelled, %8llu bytes in, %8llu out; "
                   "handler p50 %.1f us, p99 %.1f us, max %.1f us (last %llu)\n",
                   functions[i], (unsigned long long)fs.served, (unsigned long long)fs.failed,
                   (unsigned long long)fs.cancelled, (unsigned long long)fs.bytes_in,
                   (unsigned long long)fs.bytes_out, fs.handler_ns_p50 / 1e3, fs.handler_ns_p99 / 1e3,
                   fs.handler_ns_max / 1e3, (unsigned long long)fs.window);
        }
        fflush(stdout);
        status = reached ? 0 : 1;
    }
    CHECK(rpcagent_shutdown(agent, 1, 60000));
    rpcagent_free(agent);
    return status;
}

/* ---- no launcher: start a world on this host ---- */

static int launched(void) {
    const char *vars[] = {"RPCAGENT_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]) != NULL) return 1;
    return 0;
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        return 29500;
    int port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static int run_world(int trainers) {
    char port[16], value[16];
    snprintf(port, sizeof port, "%d", free_port());
    int n = trainers + 1;
    pid_t pids[MAX_TRAINERS + 1];
    fflush(NULL);
    for (int r = 0; r < n; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            snprintf(value, sizeof value, "%d", r);
            setenv("RANK", value, 1);
            snprintf(value, sizeof value, "%d", n);
            setenv("WORLD_SIZE", value, 1);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            setenv("MASTER_PORT", port, 1);
            _exit(run_rank());
        }
    }
    int failed = 0;
    for (int r = 0; r < n; r++) {
        int status;
        waitpid(pids[r], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
    }
    return failed;
}

int main(int argc, char **argv) {
    int trainers = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--trainers") == 0) trainers = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--epochs") == 0) epochs = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--target") == 0) target = atof(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [--trainers N] [--epochs E] [--target LOSS]\n", argv[0]);
            return 2;
        }
    }
    if (trainers < 1 || trainers > MAX_TRAINERS || epochs < 1) {
        fprintf(stderr, "trainers must be 1..%d and epochs at least 1\n", MAX_TRAINERS);
        return 2;
    }
    if (launched()) return run_rank();
    printf("no launcher found: starting 1 parameter server + %d trainers on this host\n", trainers);
    return run_world(trainers);
}
