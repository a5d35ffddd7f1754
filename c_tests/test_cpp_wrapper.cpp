// The C++ wrapper (rpcagent.hpp): RAII, lambda handlers, exceptions as
// handler errors, futures, deferred replies from another thread, and a
// world of two processes over TCP.
#include <poll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "rpcagent.hpp"

#define EXPECT(cond)                                                              \
    do {                                                                          \
        if (!(cond)) {                                                            \
            std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
            std::exit(1);                                                         \
        }                                                                         \
    } while (0)

using rpcagent::Agent;
using rpcagent::Bytes;
using rpcagent::Request;

static rpcagent_status_t status_of(const std::function<void()> &f, std::string *what = nullptr) {
    try {
        f();
    } catch (const rpcagent::Error &e) {
        if (what) *what = e.what();
        return e.status();
    }
    return RPCAGENT_OK;
}

static void in_process() {
    std::vector<Agent> world = Agent::local_world(2);
    Agent &a = world[0], &b = world[1];
    b.add("upper", [](const Request &r) {
        Bytes out = r.bytes();
        for (auto &c : out) c = static_cast<uint8_t>(std::toupper(c));
        return out;
    });
    b.add("who", [](const Request &r) { return Bytes{static_cast<uint8_t>(r.src_rank)}; }, true);
    b.add("throws", [](const Request &) -> Bytes { throw std::runtime_error("no such tensor: w3"); });
    std::thread *answerer = nullptr;
    b.add_deferred("later", [&answerer](const Request &r, rpcagent::Deferred d) {
        std::string text(r.text());
        answerer = new std::thread([d = std::move(d), text]() mutable {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            d.complete(text.data(), text.size());
        });
    });
    b.start();

    Bytes up = a.call(1, "upper", std::string_view("abc"));
    EXPECT(std::string(up.begin(), up.end()) == "ABC");
    EXPECT(a.call(1, "who").at(0) == 0);

    std::string what;
    EXPECT(status_of([&] { a.call(1, "throws"); }, &what) == RPCAGENT_ERR_HANDLER);
    EXPECT(what.find("no such tensor: w3") != std::string::npos);
    EXPECT(status_of([&] { a.call(1, "missing"); }) == RPCAGENT_ERR_NOT_FOUND);
    EXPECT(status_of([&] { a.call(7, "upper"); }) == RPCAGENT_ERR_INVALID_ARGUMENT);

    rpcagent::Future f = a.call_async(1, "later", Bytes{'h', 'i'});
    std::atomic<int> done{0};
    f.on_complete([&done] { done++; });
    EXPECT(!f.wait_for(0).has_value() || f.ready());
    Bytes later = f.get();
    EXPECT(std::string(later.begin(), later.end()) == "hi");
    for (int i = 0; i < 500 && done.load() == 0; i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT(done.load() == 1);

    // A completion queue: tags in completion order, the fd readable while
    // one waits.
    {
        rpcagent::Queue q;
        EXPECT(!q.wait(0).has_value());
        rpcagent::Future f1 = a.call_async(1, "upper", Bytes{'q', '1'});
        f1.notify(q, 11);
        EXPECT(status_of([&] { f1.notify(q, 12); }) == RPCAGENT_ERR_INVALID_ARGUMENT);
        pollfd p{q.fd(), POLLIN, 0};
        EXPECT(poll(&p, 1, 10000) == 1);
        EXPECT(q.wait(10000).value() == 11);
        EXPECT(poll(&p, 1, 0) == 0);
        Bytes got = *f1.wait_for(0);
        EXPECT(std::string(got.begin(), got.end()) == "Q1");
    }
    if (answerer) {
        answerer->join();
        delete answerer;
    }

    // Parts sent in place, a deferred reply sent in place, and a cancel.
    {
        static std::atomic<int> released{0};
        auto count = [](void *) { released++; };
        std::string head = "head:", body(1 << 20, 'x');
        std::vector<rpcagent_iovec_t> parts = {{reinterpret_cast<const uint8_t *>(head.data()), head.size()},
                                               {reinterpret_cast<const uint8_t *>(body.data()), body.size()}};
        Bytes got = a.call_async_iov(1, "upper", parts, RPCAGENT_TIMEOUT_DEFAULT, count, nullptr).get();
        EXPECT(released.load() == 1);
        EXPECT(got.size() == head.size() + body.size() && got[0] == 'H' && got.back() == 'X');
        EXPECT(status_of([&] { a.call_async_iov(9, "upper", parts, RPCAGENT_TIMEOUT_DEFAULT, count, nullptr); }) ==
               RPCAGENT_ERR_INVALID_ARGUMENT);
        EXPECT(released.load() == 2);

        static const char lent[] = "lent bytes";
        b.add_deferred("lend", [count](const Request &, rpcagent::Deferred d) {
            d.complete_owned(lent, sizeof lent - 1, count, nullptr);
        });
        Bytes back = a.call(1, "lend");
        EXPECT(std::string(back.begin(), back.end()) == "lent bytes");
        for (int i = 0; i < 1000 && released.load() < 3; i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        EXPECT(released.load() == 3);

        std::atomic<bool> noticed{false};
        b.add("spin", [&noticed](const Request &r) {
            for (int i = 0; i < 20000 && !r.cancelled(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            noticed = r.cancelled();
            return Bytes{};
        });
        rpcagent::Future spinning = a.call_async(1, "spin");
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        spinning.cancel();
        EXPECT(status_of([&] { spinning.get(); }) == RPCAGENT_ERR_CANCELLED);
        for (int i = 0; i < 5000 && !noticed.load(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        EXPECT(noticed.load());
    }

    b.remove("upper");
    EXPECT(status_of([&] { a.call(1, "upper"); }) == RPCAGENT_ERR_NOT_FOUND);
    EXPECT(a.stats().calls_ok >= 3);
    EXPECT(status_of([] { rpcagent::Config().worker_threads(0); }) == RPCAGENT_ERR_INVALID_ARGUMENT);
    EXPECT(status_of([] { rpcagent::Config().shm_ring_bytes(1000); }) == RPCAGENT_ERR_INVALID_ARGUMENT);
    EXPECT(status_of([] { rpcagent::Config().shm_ring_bytes(1 << 16); }) == RPCAGENT_OK);
}

// A loopback port that was free a moment ago, below the kernel's
// ephemeral range (where the ranks' own listeners get theirs), as
// harness.h's free_port for the C tests.
static int free_port() {
    for (int port = 20000 + getpid() % 97 * 120, tries = 0; tries < 12000; tries++, port = port < 31999 ? port + 1 : 20000) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(static_cast<uint16_t>(port));
        bool ok = fd >= 0 && bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0;
        if (fd >= 0) close(fd);
        if (ok) return port;
    }
    std::fprintf(stderr, "no free port between 20000 and 31999\n");
    std::exit(1);
}

static int over_tcp() {
    // Before fork, so both ranks agree; the old `20000 + pid % 20000`
    // could land in the ephemeral range or on a port in use.
    int port = free_port();
    pid_t child = fork();
    int rank = child == 0 ? 1 : 0;
    try {
        rpcagent::Config cfg;
        cfg.rank(rank).world_size(2).master("127.0.0.1", static_cast<uint16_t>(port)).init_timeout_ms(20000);
        Agent agent(cfg);
        agent.add("echo", [](const Request &r) { return r.bytes(); });
        agent.start();
        Bytes got = agent.call(1 - rank, "echo", Bytes(1000, static_cast<uint8_t>(rank)));
        EXPECT(got.size() == 1000 && got[999] == rank);
        agent.shutdown(true, 30000);
    } catch (const rpcagent::Error &e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        if (child == 0) std::_Exit(1);
        return 1;
    }
    if (child == 0) std::_Exit(0);
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

int main() {
    in_process();
    int failed = over_tcp();
    std::printf("c++ wrapper: %s\n", failed ? "FAILED" : "ok");
    return failed;
}
