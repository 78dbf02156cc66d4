// With KT_OPS_PROFILE set, each driver call prints the wall time of its phases to stderr: the
// accelerator host has no profiler, and this is what says which phase bounds a step.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace kt {

class PhaseTimer {
 public:
  PhaseTimer(const char* call, int64_t tokens) : enabled_(std::getenv("KT_OPS_PROFILE") != nullptr) {
    if (enabled_) report_ = std::string(call) + " T=" + std::to_string(tokens) + ":";
    last_ = std::chrono::steady_clock::now();
  }
  void mark(const char* phase) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.1f ms", phase, std::chrono::duration<double, std::milli>(now - last_).count());
    report_ += buf;
    last_ = now;
  }
  ~PhaseTimer() {
    if (enabled_) std::fprintf(stderr, "%s\n", report_.c_str());
  }

 private:
  bool enabled_;
  std::string report_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace kt
