// Device twins of fingerprint.rs and cast.rs, compiled at run time by NVRTC (no headers, so
// nothing depends on where a CUDA toolkit is installed).
//
// Every function here must give the CPU twin's bits: the constants and the integer steps are
// those of the Rust code, and the reductions are wrapping sums, whose result does not depend
// on the order the threads add in.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// fingerprint.rs's POSITION_KEYS and LANE_KEYS: lane l's key for position i is the high half of
// i * POSITION_KEY_l + LANE_KEY_l.
#define POSITION_KEY_0 0x9e3779b97f4a7c15ULL
#define POSITION_KEY_1 0xd6e8feb86659fd93ULL
#define LANE_KEY_0 0xc2b2ae3d27d4eb4fULL
#define LANE_KEY_1 0xa0761d6478bd642fULL

// The SplitMix64 finaliser, for the test pattern only (pattern.rs).
__device__ __forceinline__ u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// `k0` and `k1` are the 64-bit Weyl values of this word's position (callers step them by the
// position keys rather than multiplying per word); their high halves key the lanes. Each lane's
// square-and-add is one 32x32->64 multiply-add instruction.
__device__ __forceinline__ void add_word(u32 w, u64 k0, u64 k1, u64 &a0, u64 &a1) {
    const u32 x = w + (u32)(k0 >> 32);
    const u32 y = w ^ (u32)(k1 >> 32);
    a0 += (u64)x * x;
    a1 += (u64)y * y;
}

__device__ __forceinline__ u64 warp_sum(u64 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Four consecutive words from position `j` on (HASH = false: the read probe's plain sum).
template <bool HASH>
__device__ __forceinline__ void add_quad(const uint4 q, u64 j, u64 &a0, u64 &a1) {
    if (HASH) {
        u64 k0 = j * POSITION_KEY_0 + LANE_KEY_0;
        u64 k1 = j * POSITION_KEY_1 + LANE_KEY_1;
        add_word(q.x, k0, k1, a0, a1);
        k0 += POSITION_KEY_0; k1 += POSITION_KEY_1;
        add_word(q.y, k0, k1, a0, a1);
        k0 += POSITION_KEY_0; k1 += POSITION_KEY_1;
        add_word(q.z, k0, k1, a0, a1);
        k0 += POSITION_KEY_0; k1 += POSITION_KEY_1;
        add_word(q.w, k0, k1, a0, a1);
    } else {
        a0 += (u64)q.x + q.y + q.z + q.w;
    }
}

// One block per tile of `tile_words` words; tiles never cross a chunk boundary, so each block
// adds its partial lanes into exactly one chunk's pair in `out` (zeroed by the caller). The
// atomics are few (two per block) and, the sum being commutative, change no bits.
//
// HASH = false replaces the fingerprint by a plain sum of the words, same loads and reduction:
// the benchmark's probe of how fast this loop reads when the hashing costs nothing.
template <bool HASH>
__device__ __forceinline__ void chunk_sums(const u32 *__restrict__ words, u64 n, u64 chunk_words, u64 tile_words,
                                           u64 tiles_per_chunk, u64 *__restrict__ out) {
    const u64 tile = blockIdx.x;
    const u64 chunk = tile / tiles_per_chunk;
    const u64 start = chunk * chunk_words + (tile - chunk * tiles_per_chunk) * tile_words;
    u64 chunk_end = chunk * chunk_words + chunk_words;
    if (chunk_end > n) chunk_end = n;
    u64 end = start + tile_words;
    if (end > chunk_end) end = chunk_end;

    u64 a0 = 0, a1 = 0;
    u64 i = start;
    if (start < end && ((start & 3) == 0) && (((u64)words & 15) == 0)) {
        // 16-byte loads where the tile starts on a 16-byte boundary (a view into a buffer may not).
        // Two loads are issued before either is hashed, so that a thread's next load need not
        // wait for the hashing of its last (BENCHMARKS.md, GPU kernels: what this changed).
        const u64 vec_end = start + ((end - start) & ~3ULL);
        const u64 step = 4 * (u64)blockDim.x;
        const uint4 *v = reinterpret_cast<const uint4 *>(words);
        u64 j = start + 4 * (u64)threadIdx.x;
        for (; j + step < vec_end; j += 2 * step) {
            const uint4 q = v[j >> 2];
            const uint4 r = v[(j + step) >> 2];
            add_quad<HASH>(q, j, a0, a1);
            add_quad<HASH>(r, j + step, a0, a1);
        }
        if (j < vec_end) add_quad<HASH>(v[j >> 2], j, a0, a1);
        i = vec_end;
    }
    for (u64 j = i + threadIdx.x; j < end; j += blockDim.x) {
        if (HASH) add_word(words[j], j * POSITION_KEY_0 + LANE_KEY_0, j * POSITION_KEY_1 + LANE_KEY_1, a0, a1);
        else a0 += words[j];
    }

    __shared__ u64 part0[32], part1[32];
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { part0[warp] = a0; part1[warp] = a1; }
    __syncthreads();
    if (warp == 0) {
        const unsigned warps = (blockDim.x + 31) >> 5;
        a0 = lane < warps ? part0[lane] : 0;
        a1 = lane < warps ? part1[lane] : 0;
        a0 = warp_sum(a0);
        a1 = warp_sum(a1);
        if (lane == 0 && start < end) {
            atomicAdd(&out[2 * chunk], a0);
            atomicAdd(&out[2 * chunk + 1], a1);
        }
    }
}

extern "C" __global__ void fingerprint_chunks(const u32 *__restrict__ words, u64 n, u64 chunk_words, u64 tile_words,
                                              u64 tiles_per_chunk, u64 *__restrict__ out) {
    chunk_sums<true>(words, n, chunk_words, tile_words, tiles_per_chunk, out);
}

extern "C" __global__ void sum_chunks(const u32 *__restrict__ words, u64 n, u64 chunk_words, u64 tile_words,
                                      u64 tiles_per_chunk, u64 *__restrict__ out) {
    chunk_sums<false>(words, n, chunk_words, tile_words, tiles_per_chunk, out);
}

// Integer round-to-nearest-even on the raw bits, as cast.rs does; NaNs keep sign and top payload
// and become quiet.
__device__ __forceinline__ u16 to_bf16(u32 bits) {
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x0040u);
    return (u16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Grid-stride over groups of four elements (16-byte loads, 8-byte stores) where the pointers
// allow it, then the tail (everything, for a misaligned view).
extern "C" __global__ void f32_to_bf16(const u32 *__restrict__ src, u16 *__restrict__ dst, u64 n) {
    const u64 groups = ((u64)src & 15) == 0 && ((u64)dst & 7) == 0 ? n >> 2 : 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const uint4 *s = reinterpret_cast<const uint4 *>(src);
    uint2 *d = reinterpret_cast<uint2 *>(dst);
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const uint4 q = s[g];
        uint2 r;
        r.x = (u32)to_bf16(q.x) | ((u32)to_bf16(q.y) << 16);
        r.y = (u32)to_bf16(q.z) | ((u32)to_bf16(q.w) << 16);
        d[g] = r;
    }
    for (u64 i = 4 * groups + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = to_bf16(src[i]);
}

extern "C" __global__ void bf16_to_f32(const u16 *__restrict__ src, u32 *__restrict__ dst, u64 n) {
    const u64 groups = ((u64)src & 7) == 0 && ((u64)dst & 15) == 0 ? n >> 2 : 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const uint2 *s = reinterpret_cast<const uint2 *>(src);
    uint4 *d = reinterpret_cast<uint4 *>(dst);
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const uint2 q = s[g];
        uint4 r;
        r.x = q.x << 16;
        r.y = q.x & 0xffff0000u;
        r.z = q.y << 16;
        r.w = q.y & 0xffff0000u;
        d[g] = r;
    }
    for (u64 i = 4 * groups + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = (u32)src[i] << 16;
}

// Test and benchmark data, the twin of pattern.rs (its own index key, not the fingerprint's).
#define PATTERN_INDEX_KEY 0xd6e8feb86659fd93ULL
extern "C" __global__ void fill_pattern(u32 *__restrict__ dst, u64 n, u64 seed) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = (u32)(mix((i * PATTERN_INDEX_KEY) ^ seed) >> 32);
}
