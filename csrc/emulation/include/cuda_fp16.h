#pragma once
#include <cstdint>
#include "svnr_math.h"
struct __half { std::uint16_t bits; };
inline float __half2float(__half x) { return svnr::math::fp16_to_float(x.bits); }
inline __half __float2half(float x) { return {svnr::math::float_to_fp16(x)}; }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
