// What an AMX-BF16 GEMM can reach on this machine, against what kt_ops's reaches.
//
//   cmake -S tests/cpp -B build/cpp -G Ninja && cmake --build build/cpp --target kt_amx_ceiling
//   build/cpp/kt_amx_ceiling [threads...]        (default: 1, half the cores, all cores)
//
// Every figure runs one share per thread slot of the kt pool (slot 0 the caller, slot s the
// worker pinned to the s-th core), all leaving a barrier together, each slot timing itself.
// Each figure is given per thread two ways: by the slowest slot (what a job split evenly
// over the threads gets) and as the mean of the slots' rates (what a job whose threads claim
// tasks as they go, as the kt kernels do, can get); the percentages compare means. Cores of
// one host can differ (on a shared virtual host a core's sibling may be busy elsewhere), so
// the tile peak's line is followed by every slot's rate and the CPUs the slots ran on, which
// also shows a core doubled up or a slot that migrated. Figures, in TFLOP/s per thread:
//   tile peak    products into four independent accumulator tiles, no loads (operands
//                loaded once): the figure PERF.md calls the AMX peak, with real data.
//   load-bound   the same products in the 2x2 step every tile-register-blocked bf16 GEMM
//                runs (4 C tiles, 2 A and 2 B tiles, so one 1 KiB tile load per product),
//                with every load hitting L1: no GEMM of that blocking beats it.
//   L2 operands  the same step with its operands streaming from L2, as a GEMM's mostly are.
//   kt gemm      kt's AMX GEMM (gemm_amx_bf16) on the tasks of a Qwen3-30B-A3B layer at
//                T = 4096: 256 rows, the forward gate/up (depth 2048, 32 panels) and down
//                (depth 768, 16 panels) shapes, each call on weights that are in no cache
//                (1 GiB of weight sets in all, cycled).
// And the machine's read bandwidth, in GB/s over all threads: each thread sums its share of
// 2 GiB with 64-byte loads (best of 3), the ceiling of a weight-bound (small T) layer; then
// the int8 weight GEMMs' decode to bf16 (decode_panels_avx512) in the 256-deep chunks they take
// at small T, in GB/s of int8 read: from the same 2 GiB (memory), and from one chunk that
// stays in L1 (its compute rate).
// A kernel that keeps C in tiles through the depth needs at least one operand tile load
// per product: c C tiles leave 8 - c registers for operands, and 2x2 (c = 4) is the only
// layout reaching one load per product. Where loads are slow, the load-bound figure, not
// the tile peak, is the ceiling to plan against.
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../csrc/kernels/amx_tiles.h"
#include "../csrc/kernels/kernel_impls.h"
#include "kt/kernels.h"
#include "kt/packing.h"
#include "kt/thread_pool.h"
#include "kt/topology.h"

namespace {

constexpr double kFlopPerProduct = 2.0 * 16 * 16 * 32;  // one TDPBF16PS
constexpr int64_t kStepElems = 4 * 512;                 // one step's 4 operand tiles: 4 KiB
constexpr int64_t kL2Steps = 256;                        // steps of distinct operands: 1 MiB

enum class Operands { kNone, kL1, kL2 };

// `steps` 2x2 steps (4 products each). With operands, each step loads its 4 operand tiles
// right after their last reader, as the GEMM does: always the same 4 KiB (kL1), or the next
// 4 KiB of a 1 MiB buffer that stays in L2 (kL2).
template <Operands From>
__attribute__((target("amx-tile,amx-bf16"))) void tile_steps(int64_t steps, const uint16_t* buf) {
  kt::configure_amx_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, buf, 64);
  _tile_loadd(5, buf + 1024, 64);
  _tile_loadd(6, buf + 512, 64);
  _tile_loadd(7, buf + 1536, 64);
  constexpr bool loads = From != Operands::kNone;
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* t = From == Operands::kL2 ? buf + (s % kL2Steps) * kStepElems : buf;
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    if (loads) _tile_loadd(6, t + 512, 64);
    if (loads) _tile_loadd(4, t, 64);
    _tile_dpbf16ps(3, 5, 7);
    if (loads) _tile_loadd(5, t + 1024, 64);
    if (loads) _tile_loadd(7, t + 1536, 64);
  }
  _tile_release();
}

// A 64-byte-aligned buffer (misaligned tile rows would split cache lines): random bf16 in
// [-1, 1), like real weights and activations, or fp32 zeros.
template <typename T>
class Buffer {
 public:
  void assign(int64_t n) {
    data_.reset(static_cast<T*>(std::aligned_alloc(64, kt::round_up(n * sizeof(T), 64))));
    if constexpr (std::is_same_v<T, float>) {
      std::fill(data_.get(), data_.get() + n, 0.f);
    } else {
      uint32_t state = 12345;  // a linear congruential generator is random enough here
      for (int64_t i = 0; i < n; ++i) {
        state = state * 1664525u + 1013904223u;
        data_.get()[i] = kt::f32_to_bf16(static_cast<float>(state >> 8) / (1 << 23) - 1.f);
      }
    }
  }
  T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One timed run of fn(t) on every thread slot t < threads at once: each slot runs its own
// share exactly once (kt::run_on_each_slot), timed by itself from a spinning barrier that
// all of them leave together, so neither the pool's wake-up nor a thread taking two shares
// counts in. Also where each slot ran (the CPU when it left the barrier and when it ended).
struct SlotTimes {
  std::vector<double> seconds;
  std::vector<int> cpu_start, cpu_end;
  double slowest() const { return *std::max_element(seconds.begin(), seconds.end()); }
  // Per-thread rates of `work` done by every slot: the slowest slot's (what a job split
  // evenly gets), and the mean over the slots (what a job whose threads claim its tasks as
  // they go can get: its faster cores take more of them).
  double slowest_rate(double work) const { return work / slowest(); }
  double mean_rate(double work) const {
    double sum = 0;
    for (double secs : seconds) sum += work / secs;
    return sum / seconds.size();
  }
};

template <typename F>
SlotTimes time_slots(int threads, const F& fn) {
  SlotTimes out{std::vector<double>(threads), std::vector<int>(threads), std::vector<int>(threads)};
  std::atomic<int> arrived{0};
  kt::run_on_each_slot(threads, [&](int t) {
    arrived.fetch_add(1);
    while (arrived.load(std::memory_order_acquire) < threads) _mm_pause();
    out.cpu_start[t] = sched_getcpu();
    const auto t0 = std::chrono::steady_clock::now();
    fn(t);
    out.seconds[t] = seconds_since(t0);
    out.cpu_end[t] = sched_getcpu();
  });
  return out;
}

// The best of `rounds` runs, by their slowest slot: what a parallel kernel whose threads
// share one job would get.
template <typename F>
SlotTimes best_slots(int threads, int rounds, const F& fn) {
  SlotTimes best = time_slots(threads, fn);
  for (int r = 1; r < rounds; ++r) {
    SlotTimes run = time_slots(threads, fn);
    if (run.slowest() < best.slowest()) best = std::move(run);
  }
  return best;
}

// "cpus 0,1,2,... " of a run, and the CPUs on which two slots ran at once (none expected:
// every slot has a core of its own).
void print_placement(const SlotTimes& run) {
  std::string cpus, shared;
  std::vector<int> count(*std::max_element(run.cpu_start.begin(), run.cpu_start.end()) + 1, 0);
  for (size_t t = 0; t < run.cpu_start.size(); ++t) {
    cpus += (t ? "," : "") + std::to_string(run.cpu_start[t]);
    if (run.cpu_end[t] != run.cpu_start[t]) cpus += "->" + std::to_string(run.cpu_end[t]);
    if (++count[run.cpu_start[t]] == 2) shared += " " + std::to_string(run.cpu_start[t]);
  }
  std::printf("         slots ran on cpus %s; shared by two slots:%s\n", cpus.c_str(), shared.empty() ? " none" : shared.c_str());
}

// Sum of n (a multiple of 32) bf16 read as 32-bit words: every byte is loaded once.
__attribute__((target("avx512f"))) uint32_t read_all(const uint16_t* p, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 32) acc = _mm512_add_epi32(acc, _mm512_load_si512(p + i));
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  uint32_t sum = 0;
  for (uint32_t v : lanes) sum += v;
  return sum;
}

struct GemmShape {
  const char* name;
  int64_t m, kp, panels;
};

}  // namespace

int main(int argc, char** argv) {
  if (!kt::isa_supported(kt::Isa::kAmx)) {
    std::fprintf(stderr, "kt_amx_ceiling: this CPU (or OS) has no AMX-BF16\n");
    return 1;
  }
  const int cores = kt::machine_topology().cores();  // one pinned pool thread per core
  std::vector<int> counts;
  for (int i = 1; i < argc; ++i) {
    counts.push_back(std::atoi(argv[i]));
    if (counts.back() < 1 || counts.back() > cores) {
      std::fprintf(stderr, "kt_amx_ceiling: thread counts are 1 to %d (the cores); got '%s'\n", cores, argv[i]);
      return 2;
    }
  }
  if (counts.empty()) {
    counts = {1, std::max(1, cores / 2), cores};
    counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
  }
  const int max_threads = *std::max_element(counts.begin(), counts.end());
  std::vector<Buffer<uint16_t>> operands(max_threads);  // each thread's own L1 / L2 operands

  const GemmShape shapes[] = {{"gate/up", 256, 2048, 32}, {"down", 256, 768, 16}};
  // Per thread: its own A and C, and weight sets cycled through, 1 GiB of them over all
  // threads: more than any cache, so every call's weights come from memory.
  constexpr int64_t kWeightBytes = int64_t(1) << 30;
  struct Buffers {
    Buffer<uint16_t> a, w;
    Buffer<float> c;
  };
  std::vector<Buffers> buf(max_threads);
  const kt::KernelSet& k = *kt::select_kernels(kt::Isa::kAmx, kt::WeightFormat::kBF16);

  std::printf("%-8s %-12s %13s %13s %12s %12s\n", "threads", "figure", "slowest slot", "slots' mean",
              "% tile peak", "% load-bound");
  std::printf("%-8s %-12s %13s %13s %12s %12s\n", "", "", "TFLOP/s/thr", "TFLOP/s/thr", "(means)", "(means)");
  for (int threads : counts) {
    const int64_t steps = 1 << 20;
    const double tflop = 4 * kFlopPerProduct * steps / 1e12;
    kt::run_on_each_slot(threads, [&](int t) { operands[t].assign(kL2Steps * kStepElems); });
    auto steps_from = [&](auto from) {
      return best_slots(threads, 5, [&](int64_t t) { tile_steps<decltype(from)::value>(steps, operands[t].data()); });
    };
    const SlotTimes peak = steps_from(std::integral_constant<Operands, Operands::kNone>());
    const SlotTimes bound = steps_from(std::integral_constant<Operands, Operands::kL1>());
    const SlotTimes l2 = steps_from(std::integral_constant<Operands, Operands::kL2>());
    auto report = [&](const char* figure, const SlotTimes& run, double work) {
      const double mean = run.mean_rate(work);
      std::printf("%-8d %-12s %13.3f %13.3f %11.1f%% %11.1f%%\n", threads, figure, run.slowest_rate(work), mean,
                  100 * mean / peak.mean_rate(tflop), 100 * mean / bound.mean_rate(tflop));
    };
    report("tile peak", peak, tflop);
    std::string per_slot;
    for (double secs : peak.seconds) per_slot += " " + std::to_string(tflop / secs).substr(0, 5);
    std::printf("         TFLOP/s of each slot:%s (all %.1f)\n", per_slot.c_str(), threads * peak.mean_rate(tflop));
    print_placement(peak);
    report("load-bound", bound, tflop);
    report("L2 operands", l2, tflop);
    for (const GemmShape& s : shapes) {
      const int64_t lda = s.kp + 32, ldc = s.panels * kt::kPanelRows, wsize = s.panels * kt::kPanelRows * s.kp;
      const int64_t sets = std::max<int64_t>(2, kWeightBytes / (threads * wsize * 2));
      kt::run_on_each_slot(threads, [&](int t) {  // first written by the slot that uses them
        buf[t].a.assign(s.m * lda);
        buf[t].w.assign(wsize * sets);
        buf[t].c.assign(s.m * ldc);
      });
      const int64_t calls = 2 * sets;
      const SlotTimes run = best_slots(threads, 3, [&](int64_t t) {
        for (int64_t i = 0; i < calls; ++i)
          k.panel_gemm(s.m, s.kp, buf[t].a.data(), lda, buf[t].w.data() + (i % sets) * wsize, s.panels,
                       buf[t].c.data(), ldc, false);
      });
      report((std::string("kt ") + s.name).c_str(), run, 2.0 * s.m * s.kp * s.panels * kt::kPanelRows * calls / 1e12);
    }
    constexpr int64_t kReadBytes = int64_t(2) << 30;
    const int64_t share = kt::round_up(kReadBytes / 2 / threads, 32);  // bf16 elements per thread
    std::vector<uint32_t> sums(threads);
    kt::run_on_each_slot(threads, [&](int t) { buf[t].w.assign(share); });
    const SlotTimes read = best_slots(threads, 3, [&](int64_t t) { sums[t] = read_all(buf[t].w.data(), share); });
    std::printf("%-8d %-12s %10.1f GB/s by the slowest slot, %.1f by the slots' mean (checksum %u)\n", threads, "read",
                threads * read.slowest_rate(2e-9 * share), threads * read.mean_rate(2e-9 * share), sums[0]);
    constexpr int64_t kChunk = 16 * 256;  // int8 elements of one panel's 256-deep chunk
    const int64_t codes = share * 2 / kChunk * kChunk;  // int8 elements per thread: the same bytes
    std::vector<Buffer<uint16_t>> chunk_out(threads);
    kt::run_on_each_slot(threads, [&](int t) { chunk_out[t].assign(kChunk); });
    for (const bool from_memory : {true, false}) {
      const SlotTimes decode = best_slots(threads, 3, [&](int64_t t) {
        const auto* src = reinterpret_cast<const int8_t*>(buf[t].w.data());
        for (int64_t at = 0; at < codes; at += kChunk)
          kt::decode_panels_avx512(src + (from_memory ? at : 0), 256, 1, chunk_out[t].data());
      });
      std::printf("%-8d %-12s %10.1f GB/s of int8 by the slowest slot, %.1f by the slots' mean\n", threads,
                  from_memory ? "decode mem" : "decode L1", threads * decode.slowest_rate(1e-9 * codes),
                  threads * decode.mean_rate(1e-9 * codes));
    }
  }
  return 0;
}
