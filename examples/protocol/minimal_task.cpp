// minimal_task.cpp: minimal_task.c in C++, with a JSON library (docs/protocol.md,
// "Writing a task in C++ or Go"). It does no work: hello, an answer to every order, exit 0
// after EXIT, at EOF or on SIGTERM.
// Compile: c++ -std=c++17 -O2 -o minimal_task minimal_task.cpp
//   (nlohmann/json, header-only: Debian's nlohmann-json3-dev; any JSON library does)
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>

using json = nlohmann::json;
static int fd;

static void say(const json &msg) {  // one message, one whole line
    std::string line = msg.dump() + "\n";
    for (size_t off = 0; off < line.size();) {
        ssize_t w = write(fd, line.data() + off, line.size() - off);
        if (w < 0) std::exit(1);
        off += size_t(w);
    }
}

int main() {
    const char *env = std::getenv("CORRAL_CONTROL_FD");
    if (!env) {
        std::fputs("CORRAL_CONTROL_FD is not set: start me from corral\n", stderr);
        return 2;
    }
    fd = std::atoi(env);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    std::signal(SIGTERM, [](int) { _exit(0); });
    // transition -> {state it is valid in -> state after it}
    const std::map<std::string, std::map<std::string, std::string>> next = {
        {"CONFIGURE", {{"STANDBY", "CONFIGURED"}}}, {"START", {{"CONFIGURED", "RUNNING"}}},
        {"STOP", {{"RUNNING", "CONFIGURED"}}},      {"RESET", {{"CONFIGURED", "STANDBY"}}},
        {"EXIT", {{"STANDBY", "DONE"}, {"CONFIGURED", "DONE"}}}};
    std::string state = "STANDBY", buf;
    say({{"state", state}, {"pid", getpid()}, {"protocol", 1}});
    char chunk[65536];
    for (ssize_t r; (r = read(fd, chunk, sizeof chunk)) > 0;) {  // 0: EOF, the controller is gone
        buf.append(chunk, size_t(r));
        for (size_t nl; (nl = buf.find('\n')) != std::string::npos; buf.erase(0, nl + 1)) {
            json order = json::parse(buf.substr(0, nl), nullptr, false);
            if (!order.is_object()) continue;  // an empty line (the controller sends no bad JSON)
            auto id = order.value("id", 0L);
            auto t = order.value("transition", std::string());
            auto row = next.find(t);
            if (row == next.end()) {
                say({{"id", id}, {"error", "unknown transition " + t}});
            } else if (!row->second.count(state)) {
                say({{"id", id}, {"error", "cannot " + t + " in state " + state}});
            } else {
                // the transition's work goes here: order["args"]["chans.NAME.address"], ...
                state = row->second.at(state);
                say({{"id", id}, {"state", state}});
                if (state == "DONE") return 0;
            }
        }
    }
    return 0;
}
