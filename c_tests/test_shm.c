/* Shared memory between ranks on one host, through the C ABI, in processes:
 * - a killed peer in the middle of a large transfer: rank 0 sends 256 MiB
 *   to rank 1 through small rings (16 KiB, so the transfer takes a while);
 *   rank 1 learns the call has started (over its own connection to rank 0)
 *   and exits at once. The call fails with RPCAGENT_ERR_PEER_LOST within
 *   seconds, never hangs, and later calls to rank 1 fail at once; rank 0
 *   goes on serving and calling itself.
 * - shared memory refused falls back to TCP, never to an error: with the
 *   test hook RPCAGENT_TEST_FAIL_SHM=create (memfd refused where rings are
 *   made) and =map (the peer's memory refused where it is mapped), calls
 *   work and rpcagent_peer_transport says "tcp".
 * - a peer writing impossible counters into the ring it writes (test hook
 *   RPCAGENT_TEST_FAIL_SHM=corrupt: a thread in rank 1 scribbles over the
 *   ring's write counter from 300 ms on): rank 0's calls to it fail with
 *   RPCAGENT_ERR_PEER_LOST naming the impossible counter, within seconds,
 *   and rank 0 does not crash and still serves itself.
 * - a large payload both ways through rings smaller than it: the bytes
 *   arrive whole, in order, many times over.
 * - the default ring size: two ranks on a host map rings of 1 MiB.
 * - 64 ranks on this host, all-to-all: every rank calls every rank (itself
 *   included) with 20 calls in flight, every reply checked, every other
 *   rank then reached over shared memory, and no thread added for it (the
 *   process's threads are counted before the first call and after the
 *   last); with 64 ranks the default rings are 128 KiB, so rank 0 maps
 *   under 33 MiB of rings.
 * - the same with a descriptor limit of 512: a rank keeps at most an eighth
 *   of its limit's worth of same-host connections (64), so some peers are
 *   reached over shared memory and the rest over TCP, and every call is
 *   still answered.
 * Under RPCAGENT_TRANSPORT=tcp (the suite's second run) the same worlds
 * run over TCP: the expectations on how calls travel say so. */
#include "harness.h"

#include <dirent.h>
#include <pthread.h>
#include <sys/resource.h>
#include <stdatomic.h>

static int32_t echo(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    return rpcagent_reply_set(reply, req->args, req->args_len);
}

static int tcp_everywhere(void) {
    const char *t = getenv("RPCAGENT_TRANSPORT");
    return t && strcmp(t, "tcp") == 0;
}

/* Joins the world from the environment, with rings of `ring_bytes`. */
static rpcagent_t *join_with_rings(uint64_t ring_bytes) {
    rpcagent_config_t *cfg = rpcagent_config_new();
    CHECK(cfg != NULL);
    CHECK_OK(rpcagent_config_from_env(cfg));
    CHECK_OK(rpcagent_config_set_init_timeout_ms(cfg, 30000));
    CHECK_OK(rpcagent_config_set_shm_ring_bytes(cfg, ring_bytes));
    rpcagent_t *agent = NULL;
    CHECK_OK(rpcagent_init(cfg, &agent));
    rpcagent_config_free(cfg);
    return agent;
}

/* ---- a peer killed mid-transfer ---- */

enum { BIG = 256 << 20 };
static atomic_int big_call_started;

static int32_t started(void *u, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    (void)u;
    (void)req;
    int32_t s = atomic_load(&big_call_started);
    return rpcagent_reply_set(reply, (const uint8_t *)&s, sizeof s);
}

static void *die_soon(void *arg) {
    (void)arg;
    usleep(20 * 1000);
    fflush(NULL);
    _exit(0); /* every descriptor closes, as on SIGKILL */
    return NULL;
}

static void killed_mid_transfer(void) {
    rpcagent_t *agent = join_with_rings(16384);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "started", started, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 30000));
    uint32_t me = rpcagent_rank(agent);
    if (me == 1) {
        /* Ask rank 0 until its big call has started, then die. */
        for (;;) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_call_sync(agent, 0, "started", NULL, 0, 10000, &out));
            int32_t s;
            CHECK(out.len == sizeof s);
            memcpy(&s, out.data, sizeof s);
            rpcagent_buffer_free(&out);
            if (s) break;
            usleep(1000);
        }
        pthread_t t;
        CHECK(pthread_create(&t, NULL, die_soon, NULL) == 0);
        for (;;) pause();
    }
    uint8_t *big = malloc(BIG);
    CHECK(big != NULL);
    fill_pattern(big, BIG, 7);
    rpcagent_future_t *f = NULL;
    double t0 = now_ms();
    CHECK_OK(rpcagent_call_async(agent, 1, "echo", big, BIG, 120000, &f));
    atomic_store(&big_call_started, 1);
    rpcagent_buffer_t out;
    CHECK_STATUS(rpcagent_future_wait(f, 120000, &out), RPCAGENT_ERR_PEER_LOST);
    double took = now_ms() - t0;
    printf("a 256 MiB call to a rank killed mid-transfer failed after %.0f ms\n", took);
    CHECK(took < 10000);
    rpcagent_future_free(f);
    t0 = now_ms();
    CHECK_STATUS(rpcagent_call_sync(agent, 1, "echo", big, 16, 120000, &out), RPCAGENT_ERR_PEER_LOST);
    CHECK(now_ms() - t0 < 1000);
    CHECK_OK(rpcagent_call_sync(agent, 0, "echo", big, 1 << 20, 10000, &out));
    CHECK(out.len == 1 << 20 && memcmp(out.data, big, 1 << 20) == 0);
    rpcagent_buffer_free(&out);
    free(big);
    rpcagent_shutdown(agent, 0, 5000);
    rpcagent_free(agent);
}

/* ---- shared memory refused: TCP instead ---- */

static void falls_back(void) {
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    uint32_t me = rpcagent_rank(agent), other = 1 - me;
    uint8_t msg[1000];
    fill_pattern(msg, sizeof msg, me);
    for (int i = 0; i < 100; i++) {
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, other, "echo", msg, sizeof msg, 10000, &out));
        CHECK(out.len == sizeof msg && memcmp(out.data, msg, sizeof msg) == 0);
        rpcagent_buffer_free(&out);
    }
    CHECK(strcmp(rpcagent_peer_transport(agent, other), "tcp") == 0);
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

/* ---- a peer writing impossible counters ---- */

static void corrupt_peer(void) {
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    if (rpcagent_rank(agent) == 1) {
        usleep(6 * 1000 * 1000);
        rpcagent_shutdown(agent, 0, 1000);
        rpcagent_free(agent);
        return;
    }
    double t0 = now_ms();
    rpcagent_status_t st = RPCAGENT_OK;
    char why[512] = "";
    while (st == RPCAGENT_OK && now_ms() - t0 < 5000) {
        rpcagent_buffer_t out;
        st = rpcagent_call_sync(agent, 1, "echo", (const uint8_t *)"still sane?", 11, 5000, &out);
        if (st == RPCAGENT_OK) {
            CHECK(out.len == 11 && memcmp(out.data, "still sane?", 11) == 0);
            rpcagent_buffer_free(&out);
        } else {
            snprintf(why, sizeof why, "%s", rpcagent_last_error());
        }
        usleep(1000);
    }
    if (tcp_everywhere()) {
        CHECK(st == RPCAGENT_OK); /* no shared memory, nothing to corrupt */
    } else {
        printf("a peer scribbling on its ring was lost after %.0f ms: %s\n", now_ms() - t0, why);
        CHECK(st == RPCAGENT_ERR_PEER_LOST);
        CHECK(strstr(why, "impossible") != NULL);
    }
    rpcagent_buffer_t out;
    CHECK_OK(rpcagent_call_sync(agent, 0, "echo", (const uint8_t *)"me", 2, 5000, &out));
    rpcagent_buffer_free(&out);
    rpcagent_shutdown(agent, 0, 1000);
    rpcagent_free(agent);
}

/* ---- large payloads both ways through small rings ---- */

static void large_both_ways(void) {
    rpcagent_t *agent = join_with_rings(4096);
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_register(agent, "echo_inline", echo, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_start(agent));
    uint32_t me = rpcagent_rank(agent), other = 1 - me;
    enum { N = 8, LEN = 3 << 20 };
    uint8_t *msg[N];
    rpcagent_future_t *fs[N];
    for (int i = 0; i < N; i++) {
        size_t len = LEN + (size_t)i * 4099;
        msg[i] = malloc(len);
        CHECK(msg[i] != NULL);
        fill_pattern(msg[i], len, me * 100 + i);
        CHECK_OK(rpcagent_call_async(agent, other, i % 2 ? "echo" : "echo_inline", msg[i], len, 60000, &fs[i]));
    }
    for (int i = 0; i < N; i++) {
        rpcagent_buffer_t out;
        size_t len = LEN + (size_t)i * 4099;
        CHECK_OK(rpcagent_future_wait(fs[i], 60000, &out));
        CHECK(out.len == len && memcmp(out.data, msg[i], len) == 0);
        rpcagent_buffer_free(&out);
        rpcagent_future_free(fs[i]);
        free(msg[i]);
    }
    CHECK(strcmp(rpcagent_peer_transport(agent, other), tcp_everywhere() ? "tcp" : "shm") == 0);
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

/* ---- 64 ranks, all-to-all ---- */

static int threads_now(void) {
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* Bytes of this process's mappings of rings (memfds named rpcagent-rings). */
static double ring_mib_mapped(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    CHECK(f != NULL);
    char line[512];
    double mib = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (strstr(line, "rpcagent-rings") && sscanf(line, "%lx-%lx", &lo, &hi) == 2) mib += (hi - lo) / 1048576.0;
    }
    fclose(f);
    return mib;
}

static int few_descriptors;

static void all_to_all(void) {
    if (few_descriptors) {
        struct rlimit lim = {512, 512};
        CHECK(setrlimit(RLIMIT_NOFILE, &lim) == 0);
    }
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, RPCAGENT_HANDLER_INLINE));
    CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 60000));
    int threads = threads_now();
    uint32_t me = rpcagent_rank(agent), n = rpcagent_world_size(agent);
    enum { PER_PEER = 20 };
    for (uint32_t k = 0; k < n; k++) {
        uint32_t dst = (me + k) % n; /* everyone starts on a different rank */
        rpcagent_future_t *fs[PER_PEER];
        uint32_t sent[PER_PEER];
        for (int i = 0; i < PER_PEER; i++) {
            sent[i] = me * 100000 + dst * 100 + (uint32_t)i;
            CHECK_OK(rpcagent_call_async(agent, dst, "echo", (const uint8_t *)&sent[i], sizeof sent[i], 60000, &fs[i]));
        }
        for (int i = 0; i < PER_PEER; i++) {
            rpcagent_buffer_t out;
            CHECK_OK(rpcagent_future_wait(fs[i], 60000, &out));
            CHECK(out.len == sizeof sent[i] && memcmp(out.data, &sent[i], sizeof sent[i]) == 0);
            rpcagent_buffer_free(&out);
            rpcagent_future_free(fs[i]);
        }
    }
    CHECK_OK(rpcagent_barrier(agent, 60000));
    int over_shm = 0;
    for (uint32_t r = 0; r < n; r++) {
        const char *way = rpcagent_peer_transport(agent, r);
        CHECK(way != NULL);
        if (r == me) {
            CHECK(strcmp(way, "self") == 0);
        } else if (tcp_everywhere()) {
            CHECK(strcmp(way, "tcp") == 0);
        } else if (!few_descriptors) {
            CHECK(strcmp(way, "shm") == 0);
        } else {
            CHECK(strcmp(way, "shm") == 0 || strcmp(way, "tcp") == 0);
        }
        over_shm += strcmp(way, "shm") == 0;
    }
    CHECK(threads_now() == threads);
    if (me == 0)
        printf("64 ranks all-to-all%s: %d threads per process, before and after; rank 0 reaches %d ranks over "
               "shared memory and maps %.1f MiB of rings\n",
               few_descriptors ? ", 512 descriptors" : "", threads, over_shm, ring_mib_mapped());
    if (few_descriptors && !tcp_everywhere()) CHECK(over_shm > 0 && over_shm < (int)n - 1);
    /* 64 ranks on a host get the smallest default rings (128 KiB): rank 0's
     * 126 connections (63 each way) map about 32 MiB, 64 ranks about 1 GiB. */
    if (me == 0 && !few_descriptors) CHECK(ring_mib_mapped() < 33.0);
    CHECK_OK(rpcagent_shutdown(agent, 1, 60000));
    rpcagent_free(agent);
}

/* ---- ring sizes by default ---- */

/* Two ranks on one host, default settings: few ranks on a host get large
 * rings (1 MiB: a large transfer's copies overlap). Rank 0 maps two
 * connections of two rings each: rank 1's (its barrier call) and its own
 * call's. */
static void default_rings(void) {
    rpcagent_t *agent = join_from_env();
    CHECK_OK(rpcagent_register(agent, "echo", echo, NULL, NULL, 0));
    CHECK_OK(rpcagent_start(agent));
    CHECK_OK(rpcagent_barrier(agent, 30000));
    if (rpcagent_rank(agent) == 0) {
        uint8_t msg[64] = {1};
        rpcagent_buffer_t out;
        CHECK_OK(rpcagent_call_sync(agent, 1, "echo", msg, sizeof msg, 10000, &out));
        CHECK(out.len == sizeof msg && memcmp(out.data, msg, sizeof msg) == 0);
        rpcagent_buffer_free(&out);
        double mib = ring_mib_mapped();
        printf("2 ranks, default rings: rank 0 maps %.2f MiB of rings\n", mib);
        if (tcp_everywhere())
            CHECK(mib == 0);
        else
            CHECK(mib >= 4.0 && mib < 4.1);
    }
    CHECK_OK(rpcagent_barrier(agent, 30000));
    CHECK_OK(rpcagent_shutdown(agent, 1, 30000));
    rpcagent_free(agent);
}

int main(void) {
    int failed = run_world("large both ways", 2, large_both_ways, "RANK", "WORLD_SIZE", 120);
    failed |= run_world("default rings", 2, default_rings, "RANK", "WORLD_SIZE", 60);
    failed |= run_world("killed mid-transfer", 2, killed_mid_transfer, "RANK", "WORLD_SIZE", 120);
    setenv("RPCAGENT_TEST_FAIL_SHM", "create", 1);
    failed |= run_world("memfd refused", 2, falls_back, "RANK", "WORLD_SIZE", 60);
    setenv("RPCAGENT_TEST_FAIL_SHM", "map", 1);
    failed |= run_world("mapping refused", 2, falls_back, "RANK", "WORLD_SIZE", 60);
    setenv("RPCAGENT_TEST_FAIL_SHM", "corrupt", 1);
    failed |= run_world("corrupt ring", 2, corrupt_peer, "RANK", "WORLD_SIZE", 60);
    unsetenv("RPCAGENT_TEST_FAIL_SHM");
    setenv("RPCAGENT_WORKER_THREADS", "2", 1);
    failed |= run_world("64 ranks all-to-all", 64, all_to_all, "RANK", "WORLD_SIZE", 240);
    few_descriptors = 1;
    failed |= run_world("64 ranks, 512 descriptors", 64, all_to_all, "RANK", "WORLD_SIZE", 240);
    few_descriptors = 0;
    unsetenv("RPCAGENT_WORKER_THREADS");
    if (failed) return 1;
    printf("shm: ok\n");
    return 0;
}
