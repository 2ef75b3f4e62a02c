#version 450
// Greedy sampling on the device: for each row r < rows of a step's logits (row r at
// element r * ld), the index of its first largest value, NaN ignored, as
// caldera_engine::sampler::argmax picks it (every value -inf: the first of them; every
// value NaN: 0). Only that index goes back to the host, not the row (a 150k-entry
// vocabulary row is 600 KB per sequence and token).
// Workgroup (r, part) (flat index r * parts + part) scans elements part * span ..
// (part + 1) * span of row r and writes its best (value bits, index) to the partials;
// the last part of a row to finish (an atomic count per row, reset by that workgroup, so
// the counts are zero between dispatches) combines them and writes ids[r].
// Binding 0: logits (f32). 1: partials (u32 pairs, rows * parts). 2: counts (u32 per
// row, zero between dispatches). 3: ids (u32 per row).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Lbuf { float lg[]; };
layout(std430, binding = 1) coherent buffer Pbuf { uint part[]; };
layout(std430, binding = 2) coherent buffer Cbuf { uint cnt[]; };
layout(std430, binding = 3) writeonly buffer Ibuf { uint ids[]; };

layout(push_constant) uniform Push {
    uint n;     // values per row
    uint ld;    // elements between rows
    uint rows;
    uint parts; // workgroups per row
    uint span;  // values per workgroup
} p;

const uint NONE = 0xffffffffu;

shared float bv_s[WG];
shared uint bi_s[WG];
shared bool last_s;

// Whether (v, i) beats (bv, bi): larger, or equal and earlier. A NaN compares false
// both ways, so it never wins; the start (-inf, NONE) loses to any -inf.
bool better(float v, uint i, float bv, uint bi) {
    return v > bv || (v == bv && i < bi);
}

// The workgroup's best of every invocation's (bv, bi), in bv_s[0], bi_s[0].
void reduce_best(float bv, uint bi) {
    uint tid = gl_LocalInvocationID.x;
    bv_s[tid] = bv;
    bi_s[tid] = bi;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s) {
            float ov = bv_s[tid + s];
            uint oi = bi_s[tid + s];
            if (better(ov, oi, bv_s[tid], bi_s[tid])) {
                bv_s[tid] = ov;
                bi_s[tid] = oi;
            }
        }
        barrier();
    }
}

void main() {
    uint grp = flat_group();
    uint r = grp / p.parts;
    uint pi = grp % p.parts;
    if (r >= p.rows) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint lo = pi * p.span;
    uint hi = min(lo + p.span, p.n);
    float bv = uintBitsToFloat(0xff800000u); // -inf
    uint bi = NONE;
    uint base = r * p.ld;
    // Each invocation's indices rise, so a later equal value never replaces an earlier.
    for (uint i = lo + tid; i < hi; i += WG) {
        float v = lg[base + i];
        if (better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    reduce_best(bv, bi);
    if (tid == 0u) {
        part[2u * grp] = floatBitsToUint(bv_s[0]);
        part[2u * grp + 1u] = bi_s[0];
    }
    // The last part of row r to get here combines every part's best.
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(cnt[r], 1u);
        last_s = done == p.parts - 1u;
        if (last_s) {
            cnt[r] = 0u;
        }
    }
    barrier();
    if (!last_s) {
        return; // uniform for the workgroup
    }
    memoryBarrierBuffer();
    bv = uintBitsToFloat(0xff800000u);
    bi = NONE;
    for (uint j = tid; j < p.parts; j += WG) {
        uint q = 2u * (r * p.parts + j);
        float v = uintBitsToFloat(part[q]);
        uint i = part[q + 1u];
        if (i != NONE && better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    reduce_best(bv, bi);
    if (tid == 0u) {
        ids[r] = bi_s[0] == NONE ? 0u : bi_s[0];
    }
}
