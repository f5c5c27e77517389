// Schedule lookups on the CPU (DESIGN.md §1.2-1.3): gamma, time_from_variance and time_map, the same
// functions as svnr_fast.reference._gamma / _time_from_variance / _time_map, operation for operation.
//
// One task per tile of kTile pixels of one (image, channel) row (time_map: of one image, its channels
// reduced to their maximum first). gamma is one vectorised loop of table reads; tau(v) is TimeLookup
// (cpu_common.h): a direct index built per call and checked, or a branch-free binary search for few values.
// Bytes per element (float32): gamma and time_from_variance read 4 and write 4; time_map reads 4 per element
// and writes 4 per pixel.
#include "cpu_common.h"

namespace svnr {
namespace SVNR_CPU_NAMESPACE {
namespace {

template <typename T>
void elementwise(const LookupArgs& args, int threads) {
  const T* table = static_cast<const T*>(args.table.data);
  const int last = args.table.last;
  const int64_t tiles = ceil_div(args.pixels, kTile), rows = args.batch * args.channels;
  T* out = static_cast<T*>(args.out);
  const TimeLookup<T> times(table, last, args.op == Lookup::kGamma ? 0 : rows * args.pixels);
#pragma omp parallel num_threads(thread_count(threads, rows * args.pixels))
  {
    Buffer<T> values(kTile);
    Buffer<int> segment(kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * tiles; ++task) {
      const int64_t row = task / tiles, p = (task % tiles) * kTile, n = min64(kTile, args.pixels - p);
      const int64_t b = row / args.channels, c = row % args.channels;
      const T* input = values.data();
      if (args.input.stride_p == 1 && args.input.dtype == args.dtype)
        input = static_cast<const T*>(args.input.data) + b * args.input.stride_b + c * args.input.stride_c + p;
      else
        load_row(args.input, b, c, p, n, values.data());
      T* result = out + row * args.pixels + p;
      if (args.op == Lookup::kGamma)
        gamma_row(input, n, table, last, result);
      else
        times.row(input, n, segment.data(), result);
    }
  }
}

template <typename T>
void time_map(const LookupArgs& args, int threads) {
  const T* table = static_cast<const T*>(args.table.data);
  const int64_t tiles = ceil_div(args.pixels, kTile);
  T* out = static_cast<T*>(args.out);
  const TimeLookup<T> times(table, args.table.last, args.batch * args.pixels);
#pragma omp parallel num_threads(thread_count(threads, args.batch * args.channels * args.pixels))
  {
    Buffer<T> largest(kTile), values(kTile);
    Buffer<int> segment(kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < args.batch * tiles; ++task) {
      const int64_t b = task / tiles, p = (task % tiles) * kTile, n = min64(kTile, args.pixels - p);
      load_row(args.input, b, 0, p, n, largest.data());
      for (int64_t c = 1; c < args.channels; ++c) {
        load_row(args.input, b, c, p, n, values.data());
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) largest[i] = math::select(values[i] > largest[i], values[i], largest[i]);
      }
      times.row(largest.data(), n, segment.data(), out + b * args.pixels + p);
    }
  }
}

}  // namespace

void lookup(const LookupArgs& args, int threads) {
  dispatch_compute(args.dtype, [&](auto compute) {
    using T = decltype(compute);
    const int64_t values = args.batch * (args.op == Lookup::kTimeMap ? 1 : args.channels) * args.pixels;
    advise_huge_pages(args.out, values * int64_t(sizeof(T)));
    if (args.op == Lookup::kTimeMap)
      time_map<T>(args, threads);
    else
      elementwise<T>(args, threads);
  });
}

}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
