/* rpcagent_free closes every descriptor the agent opened, whichever threads
 * made calls through it: here four user threads call rank 1 while the
 * agent lives (bursts of async calls waited with wait_any, with completion
 * callbacks, by polling is_ready, and sync calls), and the main thread, which
 * outlives the agent, issues corked bursts itself; one more thread abandons
 * a corked burst and lingers, calling nothing, until after the free. Each
 * rank counts its open
 * descriptors before rpcagent_init and after rpcagent_free. */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>

#include "harness.h"

enum { BURST = 64, ROUNDS = 20 };

static rpcagent_t *agent;
static int rank_is_zero;

static int open_descriptors(void) {
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int n = 0;
    while (readdir(d) != NULL) n++;
    closedir(d);
    return n; /* counts ".", ".." and the directory's own descriptor too */
}

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static void issue(rpcagent_future_t **f, int n) {
    for (int i = 0; i < n; i++) {
        CHECK_OK(rpcagent_call_async(agent, 1, "echo", (const uint8_t *)&i, sizeof i, 10000, &f[i]));
    }
}

static void *with_wait_any(void *arg) {
    (void)arg;
    rpcagent_future_t *f[BURST];
    for (int r = 0; r < ROUNDS; r++) {
        issue(f, BURST);
        for (int left = BURST; left > 0; left--) {
            size_t i;
            CHECK_OK(rpcagent_future_wait_any(f, (size_t)left, 10000, &i));
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_future_wait(f[i], 0, &out));
            rpcagent_buffer_free(&out);
            rpcagent_future_free(f[i]);
            f[i] = f[left - 1];
        }
    }
    return NULL;
}

static atomic_int called_back;
static void count(void *u) {
    (void)u;
    atomic_fetch_add(&called_back, 1);
}

static void *with_callbacks(void *arg) {
    (void)arg;
    rpcagent_future_t *f[BURST];
    for (int r = 0; r < ROUNDS; r++) {
        issue(f, BURST);
        for (int i = 0; i < BURST; i++) {
            CHECK_OK(rpcagent_future_on_complete(f[i], count, NULL));
            rpcagent_future_free(f[i]);
        }
    }
    double give_up = now_ms() + 20000;
    while (atomic_load(&called_back) < BURST * ROUNDS) {
        CHECK(now_ms() < give_up);
        usleep(1000);
    }
    return NULL;
}

static void *by_polling(void *arg) {
    (void)arg;
    rpcagent_future_t *f[BURST];
    for (int r = 0; r < ROUNDS; r++) {
        issue(f, BURST);
        for (int i = 0; i < BURST; i++) {
            while (!rpcagent_future_is_ready(f[i])) sched_yield();
            rpcagent_future_free(f[i]);
        }
    }
    return NULL;
}

static void *sync_calls(void *arg) {
    (void)arg;
    for (int i = 0; i < BURST * ROUNDS / 4; i++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)&i, sizeof i, 10000, &out));
        rpcagent_buffer_free(&out);
    }
    return NULL;
}

static pthread_t lingering;
static pthread_mutex_t linger_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t linger_cond = PTHREAD_COND_INITIALIZER;
static int linger_state; /* 1: burst abandoned; 2: may exit */

static void *abandon_and_linger(void *arg) {
    (void)arg;
    rpcagent_future_t *f[BURST];
    issue(f, BURST);
    for (int i = 0; i < BURST; i++) rpcagent_future_free(f[i]);
    pthread_mutex_lock(&linger_lock);
    linger_state = 1;
    pthread_cond_broadcast(&linger_cond);
    while (linger_state != 2) pthread_cond_wait(&linger_cond, &linger_lock);
    pthread_mutex_unlock(&linger_lock);
    return NULL;
}

static void body(void) {
    int before = open_descriptors();
    agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    rank_is_zero = rpcagent_rank(agent) == 0;
    if (rank_is_zero) {
        void *(*kinds[])(void *) = {with_wait_any, with_callbacks, by_polling, sync_calls};
        pthread_t threads[4];
        for (int i = 0; i < 4; i++) CHECK(pthread_create(&threads[i], NULL, kinds[i], NULL) == 0);
        /* This thread corks bursts of its own and lives past the agent. */
        rpcagent_future_t *f[BURST];
        for (int r = 0; r < ROUNDS; r++) {
            issue(f, BURST);
            for (int i = 0; i < BURST; i++) {
                rpcagent_buffer_t out;
                CHECK_OK(rpcagent_future_wait(f[i], RPCAGENT_WAIT_FOREVER, &out));
                rpcagent_buffer_free(&out);
                rpcagent_future_free(f[i]);
            }
        }
        for (int i = 0; i < 4; i++) CHECK(pthread_join(threads[i], NULL) == 0);
        /* A thread that abandons a burst (its batch is written by the I/O
         * loop) and then lingers, making no further call, past the free. */
        CHECK(pthread_create(&lingering, NULL, abandon_and_linger, NULL) == 0);
        pthread_mutex_lock(&linger_lock);
        while (linger_state == 0) pthread_cond_wait(&linger_cond, &linger_lock);
        pthread_mutex_unlock(&linger_lock);
    }
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    CHECK(open_descriptors() > before); /* sockets are still open until freed */
    rpcagent_free(agent);
    int after = open_descriptors();
    if (after != before) {
        fprintf(stderr, "rank %d: %d descriptors before init, %d after free\n", (int)getpid(), before, after);
    }
    CHECK(after == before);
    if (rank_is_zero) {
        pthread_mutex_lock(&linger_lock);
        linger_state = 2;
        pthread_cond_broadcast(&linger_cond);
        pthread_mutex_unlock(&linger_lock);
        CHECK(pthread_join(lingering, NULL) == 0);
    }
}

int main(void) {
    return run_world("descriptors", 2, body, "RANK", "WORLD_SIZE", 120);
}
