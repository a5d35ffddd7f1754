// The header is usable from C++ as is (extern "C", no C-only constructs).
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

#include "rpcagent.h"

static int32_t upper(void *, const rpcagent_request_t *req, rpcagent_reply_t *reply) {
    uint8_t *out = rpcagent_reply_alloc(reply, req->args_len);
    for (size_t i = 0; i < req->args_len; i++) out[i] = static_cast<uint8_t>(std::toupper(req->args[i]));
    return 0;
}

int main() {
    std::vector<rpcagent_t *> agents(2);
    if (rpcagent_init_local(2, nullptr, agents.data()) != RPCAGENT_OK) return 1;
    if (rpcagent_register(agents[1], "upper", upper, nullptr, nullptr, 0) != RPCAGENT_OK) return 2;
    if (rpcagent_start(agents[1]) != RPCAGENT_OK) return 3;
    std::string text = "from c++";
    rpcagent_buffer_t out{};
    if (rpcagent_call_sync(agents[0], 1, "upper", reinterpret_cast<const uint8_t *>(text.data()), text.size(),
                           RPCAGENT_TIMEOUT_DEFAULT, &out) != RPCAGENT_OK)
        return 4;
    std::string got(reinterpret_cast<const char *>(out.data), out.len);
    rpcagent_buffer_free(&out);
    for (auto *a : agents) rpcagent_free(a);
    return got == "FROM C++" ? 0 : 5;
}
