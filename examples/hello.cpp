// rpcagent from C++: every rank asks the next one to reverse a string.
// Run under a launcher (torchrun, srun, mpirun) or by hand:
//   RANK=0 WORLD_SIZE=2 ./hello & RANK=1 WORLD_SIZE=2 ./hello
#include <algorithm>
#include <iostream>
#include <string>

#include "rpcagent.hpp"

int main() try {
    rpcagent::Agent agent(rpcagent::Config::from_env());
    agent.add("reverse", [](const rpcagent::Request& req) {
        rpcagent::Bytes out = req.bytes();
        std::reverse(out.begin(), out.end());
        return out;
    });
    agent.start();
    uint32_t next = (agent.rank() + 1) % agent.world_size();
    std::string text = "hello from rank " + std::to_string(agent.rank());
    rpcagent::Bytes reply = agent.call(next, "reverse", text);
    std::cout << "rank " << agent.rank() << " got: " << std::string(reply.begin(), reply.end()) << std::endl;
    agent.shutdown();
    return 0;
} catch (const rpcagent::Error& e) {
    std::cerr << "rpcagent: " << e.what() << std::endl;
    return 1;
}
