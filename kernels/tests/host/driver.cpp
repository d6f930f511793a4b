// Runs kernels.cu's kernels on the host (see shim.h) for cu_on_host.rs: inputs and outputs are
// raw little-endian files, the launch shapes those of cuda/mod.rs.
#include "shim.h"
#include "../../src/cuda/kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static std::vector<unsigned char> slurp(const char *path) {
    std::vector<unsigned char> v;
    FILE *f = std::fopen(path, "rb");
    if (!f) { std::perror(path); std::exit(2); }
    unsigned char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
    std::fclose(f);
    return v;
}

static void spit(const char *path, const void *p, size_t bytes) {
    FILE *f = std::fopen(path, "wb");
    if (!f || std::fwrite(p, 1, bytes, f) != bytes) { std::perror(path); std::exit(2); }
    std::fclose(f);
}

// A 16-byte-aligned copy of the file, so `offset` (in elements) decides the alignment of the view.
static unsigned char *aligned_copy(const std::vector<unsigned char> &v) {
    unsigned char *p = static_cast<unsigned char *>(std::aligned_alloc(16, (v.size() + 16) & ~size_t(15)));
    std::memcpy(p, v.data(), v.size());
    return p;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *mode = argv[1];
    if (!std::strcmp(mode, "fingerprint") || !std::strcmp(mode, "sum")) {
        // in offset_words n chunk_words tile_words out
        std::vector<unsigned char> in = slurp(argv[2]);
        const u32 *words = reinterpret_cast<const u32 *>(aligned_copy(in)) + std::strtoull(argv[3], 0, 10);
        const u64 n = std::strtoull(argv[4], 0, 10), chunk = std::strtoull(argv[5], 0, 10);
        u64 tile = std::strtoull(argv[6], 0, 10);
        if (tile > chunk) tile = chunk;
        const u64 chunks = (n + chunk - 1) / chunk, tiles = (chunk + tile - 1) / tile;
        std::vector<u64> out(2 * chunks, 0);
        for (u64 b = 0; b < chunks * tiles; b++) {
            blockIdx.x = (unsigned)b;
            if (mode[0] == 'f') fingerprint_chunks(words, n, chunk, tile, tiles, out.data());
            else sum_chunks(words, n, chunk, tile, tiles, out.data());
        }
        spit(argv[7], out.data(), out.size() * 8);
    } else if (!std::strcmp(mode, "f32_to_bf16")) {
        // in offset n out
        std::vector<unsigned char> in = slurp(argv[2]);
        const u32 *src = reinterpret_cast<const u32 *>(aligned_copy(in)) + std::strtoull(argv[3], 0, 10);
        const u64 n = std::strtoull(argv[4], 0, 10);
        std::vector<u16> out(n + 4);
        f32_to_bf16(src, out.data(), n);
        spit(argv[5], out.data(), n * 2);
    } else if (!std::strcmp(mode, "bf16_to_f32")) {
        std::vector<unsigned char> in = slurp(argv[2]);
        const u16 *src = reinterpret_cast<const u16 *>(aligned_copy(in)) + std::strtoull(argv[3], 0, 10);
        const u64 n = std::strtoull(argv[4], 0, 10);
        std::vector<u32> out(n + 4);
        bf16_to_f32(src, out.data(), n);
        spit(argv[5], out.data(), n * 4);
    } else if (!std::strcmp(mode, "pattern")) {
        // seed n out
        const u64 seed = std::strtoull(argv[2], 0, 10), n = std::strtoull(argv[3], 0, 10);
        std::vector<u32> out(n);
        fill_pattern(out.data(), n, seed);
        spit(argv[4], out.data(), n * 4);
    } else {
        return 2;
    }
    return 0;
}
