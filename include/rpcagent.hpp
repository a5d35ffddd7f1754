// rpcagent for C++17: RAII handles over the C API in rpcagent.h.
//
//   rpcagent::Agent agent(rpcagent::Config::from_env());
//   agent.add("echo", [](const rpcagent::Request& req) { return req.bytes(); });
//   agent.start();
//   rpcagent::Bytes reply = agent.call((agent.rank() + 1) % agent.world_size(), "echo", "hi");
//   agent.shutdown();
//
// Failures throw rpcagent::Error, which carries the C status. A handler that
// throws fails the call: the caller gets RPCAGENT_ERR_HANDLER with the
// exception's message.
#ifndef RPCAGENT_HPP
#define RPCAGENT_HPP

#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "rpcagent.h"

namespace rpcagent {

/// Payload bytes.
using Bytes = std::vector<uint8_t>;

/// A failed rpcagent call: the C status and the library's message.
class Error : public std::runtime_error {
public:
    Error(rpcagent_status_t status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    rpcagent_status_t status() const noexcept { return status_; }
    /// The status's name, e.g. "RPCAGENT_ERR_TIMEOUT".
    const char *status_name() const noexcept { return rpcagent_status_str(status_); }

private:
    rpcagent_status_t status_;
};

namespace detail {

inline void check(rpcagent_status_t status) {
    if (status != RPCAGENT_OK) {
        throw Error(status, std::string(rpcagent_status_str(status)) + ": " + rpcagent_last_error());
    }
}

inline Bytes take(rpcagent_buffer_t &buf) {
    Bytes out(buf.data, buf.data + buf.len);
    rpcagent_buffer_free(&buf);
    return out;
}

inline const uint8_t *bytes_of(std::string_view s) { return reinterpret_cast<const uint8_t *>(s.data()); }

}  // namespace detail

/// Settings of one rank.
class Config {
public:
    Config() : cfg_(rpcagent_config_new()) {
        if (cfg_ == nullptr) throw Error(RPCAGENT_ERR_INTERNAL, rpcagent_last_error());
    }
    Config(Config &&other) noexcept : cfg_(std::exchange(other.cfg_, nullptr)) {}
    Config &operator=(Config &&other) noexcept {
        std::swap(cfg_, other.cfg_);
        return *this;
    }
    Config(const Config &) = delete;
    Config &operator=(const Config &) = delete;
    ~Config() { rpcagent_config_free(cfg_); }

    /// Filled from the launcher's variables (torchrun, Open MPI, MPICH, Slurm, RPCAGENT_*).
    static Config from_env() {
        Config c;
        detail::check(rpcagent_config_from_env(c.cfg_));
        return c;
    }

    Config &rank(uint32_t r) { return set(rpcagent_config_set_rank(cfg_, r)); }
    Config &world_size(uint32_t n) { return set(rpcagent_config_set_world_size(cfg_, n)); }
    Config &name(const std::string &n) { return set(rpcagent_config_set_name(cfg_, n.c_str())); }
    Config &master(const std::string &host, uint16_t port) {
        return set(rpcagent_config_set_master(cfg_, host.c_str(), port));
    }
    Config &bind(const std::string &host) { return set(rpcagent_config_set_bind(cfg_, host.c_str())); }
    Config &call_timeout_ms(uint32_t ms) { return set(rpcagent_config_set_call_timeout_ms(cfg_, ms)); }
    Config &init_timeout_ms(uint32_t ms) { return set(rpcagent_config_set_init_timeout_ms(cfg_, ms)); }
    Config &peer_timeout_ms(uint32_t ms) { return set(rpcagent_config_set_peer_timeout_ms(cfg_, ms)); }
    Config &worker_threads(uint32_t n) { return set(rpcagent_config_set_worker_threads(cfg_, n)); }
    Config &max_message_bytes(uint64_t n) { return set(rpcagent_config_set_max_message_bytes(cfg_, n)); }
    Config &send_window_bytes(uint64_t n) { return set(rpcagent_config_set_send_window_bytes(cfg_, n)); }
    /// Microseconds a waiting caller looks for its reply before sleeping.
    Config &spin_us(uint32_t us) { return set(rpcagent_config_set_spin_us(cfg_, us)); }
    /// "auto" (default) or "tcp"; see rpcagent_config_set_transport.
    Config &transport(const std::string &name) { return set(rpcagent_config_set_transport(cfg_, name.c_str())); }
    /// Bytes per shared-memory ring (a power of two); see rpcagent_config_set_shm_ring_bytes.
    Config &shm_ring_bytes(uint64_t n) { return set(rpcagent_config_set_shm_ring_bytes(cfg_, n)); }
    Config &secret(std::string_view key) {
        return set(rpcagent_config_set_secret(cfg_, detail::bytes_of(key), key.size()));
    }

    const rpcagent_config_t *get() const noexcept { return cfg_; }

private:
    Config &set(rpcagent_status_t status) {
        detail::check(status);
        return *this;
    }
    rpcagent_config_t *cfg_;
};

/// One incoming call, valid during the handler.
struct Request {
    uint32_t src_rank;
    std::string_view function;
    const uint8_t *args;
    size_t args_len;
    /// The handler's reply handle (for `cancelled`); null in deferred
    /// handlers, which ask their `Deferred`.
    const rpcagent_reply_t *reply = nullptr;

    /// True once the caller cancelled the call or its deadline passed: a
    /// handler that loops polls it (on its own thread, while it runs) and
    /// returns early; its answer is dropped. Always false in a deferred
    /// handler: use `Deferred::cancelled()`.
    bool cancelled() const { return rpcagent_reply_cancelled(reply) == 1; }

    /// The arguments, copied.
    Bytes bytes() const { return Bytes(args, args + args_len); }
    /// The arguments as text.
    std::string_view text() const { return {reinterpret_cast<const char *>(args), args_len}; }
};

/// A reply a handler deferred: answer it once, from any thread. Dropping it
/// unanswered fails the call.
class Deferred {
public:
    explicit Deferred(rpcagent_deferred_t *d) : d_(d) {}
    Deferred(Deferred &&other) noexcept : d_(std::exchange(other.d_, nullptr)) {}
    Deferred &operator=(Deferred &&other) noexcept {
        std::swap(d_, other.d_);
        return *this;
    }
    Deferred(const Deferred &) = delete;
    Deferred &operator=(const Deferred &) = delete;
    ~Deferred() {
        if (d_ != nullptr) rpcagent_deferred_fail(d_, "the deferred reply was dropped without an answer");
    }

    void complete(const Bytes &reply) { complete(reply.data(), reply.size()); }
    void complete(const void *data, size_t len) {
        detail::check(rpcagent_deferred_complete(release(), static_cast<const uint8_t *>(data), len));
    }
    void fail(const std::string &message) { detail::check(rpcagent_deferred_fail(release(), message.c_str())); }
    /// Answers with `len` bytes at `data`, sent from where they are (no
    /// copy); `done(user_data)` runs exactly once when they are no longer
    /// needed (on any thread), also if this throws.
    void complete_owned(const void *data, size_t len, rpcagent_free_fn done, void *user_data) {
        if (d_ == nullptr) {
            if (done != nullptr) done(user_data);
            throw Error(RPCAGENT_ERR_INVALID_ARGUMENT, "the deferred reply was already answered");
        }
        rpcagent_status_t s =
            rpcagent_deferred_complete_owned(d_, static_cast<const uint8_t *>(data), len, done, user_data);
        if (s == RPCAGENT_OK) d_ = nullptr;
        detail::check(s);
    }
    /// True once the caller cancelled the call or its deadline passed
    /// (answering is still allowed; the answer is dropped).
    bool cancelled() const { return rpcagent_deferred_cancelled(d_) == 1; }

private:
    rpcagent_deferred_t *release() {
        if (d_ == nullptr) throw Error(RPCAGENT_ERR_INVALID_ARGUMENT, "the deferred reply was already answered");
        return std::exchange(d_, nullptr);
    }
    rpcagent_deferred_t *d_;
};

class Queue;

/// The pollable result of an async call.
class Future {
public:
    explicit Future(rpcagent_future_t *f) : f_(f) {}
    Future(Future &&other) noexcept : f_(std::exchange(other.f_, nullptr)) {}
    Future &operator=(Future &&other) noexcept {
        std::swap(f_, other.f_);
        return *this;
    }
    Future(const Future &) = delete;
    Future &operator=(const Future &) = delete;
    /// Dropping a pending future abandons the call (its reply is discarded).
    ~Future() { rpcagent_future_free(f_); }

    bool ready() const { return rpcagent_future_is_ready(f_) == 1; }

    /// Ends a pending call at once with RPCAGENT_ERR_CANCELLED and tells the
    /// destination; a completed call keeps its outcome.
    void cancel() { detail::check(rpcagent_future_cancel(f_)); }

    /// Waits for the reply; throws Error if the call failed.
    Bytes get() { return *wait_for(RPCAGENT_WAIT_FOREVER); }

    /// Waits up to `timeout_ms` (0: not at all); nullopt if still running.
    std::optional<Bytes> wait_for(int64_t timeout_ms) {
        rpcagent_buffer_t out{};
        rpcagent_status_t s = rpcagent_future_wait(f_, timeout_ms, &out);
        if (s == RPCAGENT_PENDING) return std::nullopt;
        if (s != RPCAGENT_OK) {
            const char *why = rpcagent_future_error(f_);
            throw Error(s, std::string(rpcagent_status_str(s)) + ": " + (why ? why : rpcagent_last_error()));
        }
        return detail::take(out);
    }

    /// Runs `cb` once, on a library thread, when the call completes (at once
    /// if it has). `cb` must not block.
    void on_complete(std::function<void()> cb) {
        auto *heap = new std::function<void()>(std::move(cb));
        rpcagent_status_t s = rpcagent_future_on_complete(
            f_,
            [](void *p) {
                std::unique_ptr<std::function<void()>> fn(static_cast<std::function<void()> *>(p));
                try {
                    (*fn)();
                } catch (...) {
                    // Nowhere to report it: a callback must not throw.
                }
            },
            heap);
        if (s != RPCAGENT_OK) {
            delete heap;
            detail::check(s);
        }
    }

    /// Posts `tag` to `q` once the call completes (at once if it has), even
    /// if this Future is gone by then. One queue per future.
    inline void notify(Queue &q, uint64_t tag);

    rpcagent_future_t *get_handle() const noexcept { return f_; }

private:
    rpcagent_future_t *f_;
};

/// A completion queue: futures post tags to it as they complete, any number
/// of threads take them in completion order, and `fd()` polls readable
/// while tags wait (for the caller's own epoll/poll/asio loop).
class Queue {
public:
    Queue() { detail::check(rpcagent_queue_new(&q_)); }
    Queue(Queue &&other) noexcept : q_(std::exchange(other.q_, nullptr)) {}
    Queue &operator=(Queue &&other) noexcept {
        std::swap(q_, other.q_);
        return *this;
    }
    Queue(const Queue &) = delete;
    Queue &operator=(const Queue &) = delete;
    /// Tags of calls still attached are dropped.
    ~Queue() { rpcagent_queue_free(q_); }

    /// Takes one tag, waiting up to `timeout_ms` (0: not at all; -1: without
    /// bound); nullopt if none came.
    std::optional<uint64_t> wait(int64_t timeout_ms = RPCAGENT_WAIT_FOREVER) {
        uint64_t tag = 0;
        rpcagent_status_t s = rpcagent_queue_wait(q_, timeout_ms, &tag);
        if (s == RPCAGENT_PENDING) return std::nullopt;
        detail::check(s);
        return tag;
    }

    /// Readable (level-triggered) while tags wait; owned by the queue.
    int fd() const {
        int fd = rpcagent_queue_fd(q_);
        if (fd < 0) throw Error(RPCAGENT_ERR_IO, rpcagent_last_error());
        return fd;
    }

    rpcagent_queue_t *get_handle() const noexcept { return q_; }

private:
    rpcagent_queue_t *q_ = nullptr;
};

inline void Future::notify(Queue &q, uint64_t tag) { detail::check(rpcagent_future_notify(f_, q.get_handle(), tag)); }

/// One rank of a world.
class Agent {
public:
    /// A handler: returns the reply, or throws to fail the call.
    using Handler = std::function<Bytes(const Request &)>;
    /// A handler that answers later through the Deferred it is given.
    using DeferredHandler = std::function<void(const Request &, Deferred)>;

    /// Joins the world `cfg` describes (over TCP).
    explicit Agent(const Config &cfg) { detail::check(rpcagent_init(cfg.get(), &a_)); }
    /// A whole world in this process (no sockets).
    static std::vector<Agent> local_world(uint32_t world_size, const Config *cfg = nullptr) {
        std::vector<rpcagent_t *> raw(world_size, nullptr);
        detail::check(rpcagent_init_local(world_size, cfg ? cfg->get() : nullptr, raw.data()));
        std::vector<Agent> agents;
        agents.reserve(world_size);
        for (rpcagent_t *a : raw) agents.push_back(Agent(a));
        return agents;
    }

    Agent(Agent &&other) noexcept : a_(std::exchange(other.a_, nullptr)) {}
    Agent &operator=(Agent &&other) noexcept {
        std::swap(a_, other.a_);
        return *this;
    }
    Agent(const Agent &) = delete;
    Agent &operator=(const Agent &) = delete;
    /// Shuts down (immediately) if still running and frees; not from a handler.
    ~Agent() { rpcagent_free(a_); }

    uint32_t rank() const { return rpcagent_rank(a_); }
    uint32_t world_size() const { return rpcagent_world_size(a_); }
    /// How calls to `rank` travel ("tcp", "self", ...), or nullptr before
    /// the first call to it; see rpcagent_peer_transport.
    const char *peer_transport(uint32_t rank) const { return rpcagent_peer_transport(a_, rank); }
    uint32_t rank_of(const std::string &worker_name) const {
        uint32_t r = 0;
        detail::check(rpcagent_rank_of(a_, worker_name.c_str(), &r));
        return r;
    }

    /// Registers `h` under `name` (`inline_handler`: runs on the I/O loop;
    /// only for tiny handlers that never block).
    void add(const std::string &name, Handler h, bool inline_handler = false) {
        register_fn(name, new Slot{std::move(h), nullptr}, inline_handler);
    }

    /// Registers a handler that answers through a Deferred, possibly later
    /// from another thread; no worker is held meanwhile.
    void add_deferred(const std::string &name, DeferredHandler h) {
        register_fn(name, new Slot{nullptr, std::move(h)}, false);
    }

    void remove(const std::string &name) { detail::check(rpcagent_unregister(a_, name.c_str())); }
    void start() { detail::check(rpcagent_start(a_)); }
    void barrier(int64_t timeout_ms = RPCAGENT_WAIT_FOREVER) { detail::check(rpcagent_barrier(a_, timeout_ms)); }

    Bytes call(uint32_t dst, const std::string &function, const void *args, size_t len,
               int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT) {
        rpcagent_buffer_t out{};
        detail::check(rpcagent_call_sync(a_, dst, function.c_str(), static_cast<const uint8_t *>(args), len,
                                         timeout_ms, &out));
        return detail::take(out);
    }
    Bytes call(uint32_t dst, const std::string &function, const Bytes &args = {},
               int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT) {
        return call(dst, function, args.data(), args.size(), timeout_ms);
    }
    Bytes call(uint32_t dst, const std::string &function, std::string_view args,
               int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT) {
        return call(dst, function, args.data(), args.size(), timeout_ms);
    }

    Future call_async(uint32_t dst, const std::string &function, const void *args, size_t len,
                      int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT) {
        rpcagent_future_t *f = nullptr;
        detail::check(rpcagent_call_async(a_, dst, function.c_str(), static_cast<const uint8_t *>(args), len,
                                          timeout_ms, &f));
        return Future(f);
    }
    Future call_async(uint32_t dst, const std::string &function, const Bytes &args = {},
                      int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT) {
        return call_async(dst, function, args.data(), args.size(), timeout_ms);
    }

    /// A call whose arguments are `parts` concatenated, read where they are
    /// (header and tensor without a concatenating copy); `done(user_data)`,
    /// if given, runs exactly once when they are no longer needed (before
    /// this returns), also if it throws.
    Future call_async_iov(uint32_t dst, const std::string &function, const std::vector<rpcagent_iovec_t> &parts,
                          int64_t timeout_ms = RPCAGENT_TIMEOUT_DEFAULT, rpcagent_free_fn done = nullptr,
                          void *user_data = nullptr) {
        rpcagent_future_t *f = nullptr;
        detail::check(rpcagent_call_async_iov(a_, dst, function.c_str(), parts.data(), parts.size(), timeout_ms,
                                              done, user_data, &f));
        return Future(f);
    }

    /// Leaves the world (graceful: every rank calls it).
    void shutdown(bool graceful = true, int64_t timeout_ms = RPCAGENT_WAIT_FOREVER) {
        detail::check(rpcagent_shutdown(a_, graceful ? 1 : 0, timeout_ms));
    }

    rpcagent_stats_t stats() const {
        rpcagent_stats_t s{};
        detail::check(rpcagent_get_stats(a_, &s, sizeof s));
        return s;
    }

    rpcagent_t *get() const noexcept { return a_; }

private:
    explicit Agent(rpcagent_t *a) : a_(a) {}

    struct Slot {
        Handler plain;
        DeferredHandler deferred;
    };

    static int32_t trampoline(void *user_data, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
        auto *slot = static_cast<Slot *>(user_data);
        Request r{req->src_rank, req->function, req->args, req->args_len, slot->deferred ? nullptr : reply};
        try {
            if (slot->deferred) {
                rpcagent_deferred_t *d = rpcagent_reply_defer(reply);
                if (d == nullptr) return 1;
                slot->deferred(r, Deferred(d));
                return 0;
            }
            Bytes out = slot->plain(r);
            return rpcagent_reply_set(reply, out.data(), out.size()) == RPCAGENT_OK ? 0 : 1;
        } catch (const std::exception &e) {
            rpcagent_reply_error(reply, e.what());
        } catch (...) {
            rpcagent_reply_error(reply, "the handler threw a non-standard exception");
        }
        return 1;
    }

    void register_fn(const std::string &name, Slot *slot, bool inline_handler) {
        rpcagent_status_t s = rpcagent_register(
            a_, name.c_str(), &Agent::trampoline, slot, [](void *p) { delete static_cast<Slot *>(p); },
            inline_handler ? RPCAGENT_HANDLER_INLINE : 0);
        if (s != RPCAGENT_OK) {
            delete slot;  // a failed registration leaves the user data to us
            detail::check(s);
        }
    }

    rpcagent_t *a_ = nullptr;
};

}  // namespace rpcagent

#endif  // RPCAGENT_HPP
