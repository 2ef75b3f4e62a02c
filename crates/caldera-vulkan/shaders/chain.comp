#version 450
// Dependency-chain probe for dispatch_bench (not used by models): each workgroup reads
// `per_wg` 16-byte words of its region of `w` and folds them into one value. With
// CHAIN_WAIT (flags bit 0) and a slot above 0, invocation 0 first polls counter
// `slot - 1` until it reaches `target` (the workgroups of the dispatch before) and the
// workgroup waits for it at a barrier; with CHAIN_PREFETCH (bit 1) each invocation
// issues its first two loads before that wait. With CHAIN_WAIT every workgroup adds 1
// to counter `slot` when it is done. `backoff` ALU steps between polls. This measures
// whether counters between dispatches (no pipeline barrier) beat barriers, and whether
// loads issued before the wait hide the next op's start.
// Binding 0: w (read), 1: out (one f32 per workgroup), 2: counters (u32).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Wb { uvec4 w[]; };
layout(std430, binding = 1) writeonly buffer Ob { uint o[]; };
layout(std430, binding = 2) volatile coherent buffer Cb { uint cnt[]; };

layout(push_constant) uniform Push {
    uint base;   // first word of this dispatch's region
    uint per_wg; // words per workgroup
    uint flags;  // 1: wait / signal, 2: prefetch before the wait
    uint slot;
    uint target;
    uint backoff;
} p;

shared uint spin_seed;

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint g = flat_group();
    uint start = p.base + g * p.per_wg;
    bool chain = (p.flags & 1u) != 0u;
    bool pre = (p.flags & 2u) != 0u;
    uvec4 acc = uvec4(0u);
    uint i = tid;
    uvec4 a0 = uvec4(0u);
    uvec4 a1 = uvec4(0u);
    if (pre) {
        if (i < p.per_wg) {
            a0 = w[start + i];
        }
        if (i + WG < p.per_wg) {
            a1 = w[start + i + WG];
        }
    }
    if (chain && p.slot > 0u) {
        if (tid == 0u) {
            uint x = g;
            while (cnt[p.slot - 1u] < p.target) {
                for (uint k = 0u; k < p.backoff; k++) {
                    x = x * 1664525u + 1013904223u;
                }
            }
            spin_seed = x;
        }
        barrier();
        memoryBarrierBuffer();
    }
    if (pre) {
        acc = a0 ^ a1;
        i += 2u * WG;
    }
    for (; i < p.per_wg; i += WG) {
        acc ^= w[start + i];
    }
    uint s = acc.x ^ acc.y ^ acc.z ^ acc.w;
    if (s == 0x9e3779b9u) {
        o[g] = s + spin_seed;
    }
    if (chain) {
        memoryBarrierBuffer();
        barrier();
        if (tid == 0u) {
            atomicAdd(cnt[p.slot], 1u);
        }
    }
}
