// The emulated CUDA runtime: one fiber per thread, blocks run one after another (see README.md).
#include "cuda_runtime.h"
#include "svnr_kernels.h"

#include <stdexcept>
#include <string>
size_t g_emu_max_dynamic_shared = 48 * 1024;
namespace emu {
Fiber* current = nullptr;
ucontext_t scheduler;
dim3 block_idx, block_dim, grid_dim;
std::vector<unsigned char> dynamic_shared;
std::vector<std::uint64_t> shuffle_slots;
long long launches = 0, blocks_run = 0;
static std::vector<Fiber> fibers;
static const std::function<void()>* body = nullptr;
static std::string failure;

void fail(const std::string& what) {
  if (current == nullptr) throw std::runtime_error("CUDA emulation: " + what);
  failure = what;
  current->state = FAILED;
  swapcontext(&current->ctx, &scheduler);
  std::abort();   // a failed fiber is never resumed
}
static void entry() {
  (*body)();
  current->state = DONE;
  swapcontext(&current->ctx, &scheduler);
}
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& fn) {
  body = &fn;
  grid_dim = grid;
  block_dim = block;
  const int n = block.x * block.y * block.z;
  if ((int)fibers.size() < n) fibers.resize(n);
  shuffle_slots.assign(n, 0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++blocks_run;
        block_idx = dim3(bx, by, bz);
        dynamic_shared.assign(shared_bytes + 4096, 0xCD);   // garbage: kernels must initialise it
        for (int i = 0; i < n; ++i) {
          Fiber& f = fibers[i];
          if (f.stack.empty()) f.stack.resize(64 * 1024);
          f.linear = i;
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.state = RUNNABLE;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, entry, 0);
        }
        for (;;) {
          bool ran = false;
          for (int i = 0; i < n; ++i)
            if (fibers[i].state == RUNNABLE) {
              current = &fibers[i];
              swapcontext(&scheduler, &fibers[i].ctx);
              current = nullptr;
              if (fibers[i].state == FAILED) fail(failure);
              ran = true;
            }
          int done = 0, at_barrier = 0;
          for (int i = 0; i < n; ++i) done += fibers[i].state == DONE, at_barrier += fibers[i].state == AT_BARRIER;
          if (done == n) break;
          bool released = false;
          for (int w = 0; w < n; w += 32) {
            int waiting = 0;
            for (int l = 0; l < 32; ++l) waiting += fibers[w + l].state == AT_WARP;
            if (waiting == 32) { for (int l = 0; l < 32; ++l) fibers[w + l].state = RUNNABLE; released = true; }
            else if (waiting > 0 && !ran) {
              int d = 0; for (int l = 0; l < 32; ++l) d += fibers[w + l].state == DONE;
              if (d) fail("a warp-wide exchange (shuffle, match, __syncwarp) in a warp whose other lanes have exited");
            }
          }
          if (!released && at_barrier + done == n && at_barrier > 0) {
            for (int i = 0; i < n; ++i) if (fibers[i].state == AT_BARRIER) fibers[i].state = RUNNABLE;
            released = true;
          }
          if (!released && !ran) fail("deadlock: threads wait at __syncthreads or a shuffle that others never reach");
        }
        for (size_t i = shared_bytes; i < dynamic_shared.size(); ++i)
          if (dynamic_shared[i] != 0xCD) fail("a write past the dynamic shared memory of the launch");
      }
}
}  // namespace emu
// Read through ctypes by the test: how many kernels were launched, to tell the one-launch forward path from
// the three-launch one.
extern "C" long long svnr_emu_launches() { return emu::launches; }

namespace svnr {
int cuda_runtime_version() { return 0; }
int cuda_driver_version() { return 0; }
}
