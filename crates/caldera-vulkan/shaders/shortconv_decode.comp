#version 450
// Short-conv (LFM2) decode step for one token: bx = B * x, a causal depthwise conv of
// bx over the state's K - 1 earlier inputs, out = C * conv. One invocation per channel;
// caldera-cpu/src/shortconv.rs defines it.
// Binding 0: proj (f32: B [c] | C [c] | x [c], in_proj's rows), 1: constants (f32: conv
// taps [c][K] | conv bias [c]), 2: state ([K - 1][c], oldest row first, as the CPU's),
// 3: out (f32, c), 4: step values (read with F_BATCH only).
//
// With F_BATCH, a batched decode step: workgroups come in runs of ceil(c / WG) per
// column; column c < step[0] is the sequence in pool slot step[8 + 2c], its proj row c
// (ld_proj apart), its out row c (c apart), its state the slot's (state_stride values
// per slot). Columns past step[0] (a bucket's padding) exit at once.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer State { float st[]; };
layout(std430, binding = 3) writeonly buffer Out { float o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };

const uint F_BATCH = 1u;

layout(push_constant) uniform Push {
    uint channels;
    uint kern;
    uint flags;
    uint ld_proj;      // F_BATCH: values between proj rows
    uint state_stride; // F_BATCH: state values per pool slot
} p;

void main() {
    uint grp = flat_group();
    uint n = p.channels;
    uint pb = 0u;
    uint sb = 0u;
    uint ob = 0u;
    if ((p.flags & F_BATCH) != 0u) {
        uint per = (n + WG - 1u) / WG;
        uint col = grp / per;
        if (col >= step[0]) {
            return;
        }
        grp -= col * per;
        pb = col * p.ld_proj;
        sb = step[8u + 2u * col] * p.state_stride;
        ob = col * n;
    }
    uint ch = grp * WG + gl_LocalInvocationID.x;
    if (ch >= n) {
        return;
    }
    uint k = p.kern;
    float bx = proj[pb + ch] * proj[pb + 2u * n + ch];
    float acc = par[n * k + ch];
    for (uint i = 0u; i + 1u < k; i++) {
        acc += par[ch * k + i] * st[sb + i * n + ch];
    }
    acc += par[ch * k + k - 1u] * bx;
    if (k > 1u) {
        for (uint i = 0u; i + 2u < k; i++) {
            st[sb + i * n + ch] = st[sb + (i + 1u) * n + ch];
        }
        st[sb + (k - 2u) * n + ch] = bx;
    }
    o[ob + ch] = proj[pb + n + ch] * acc;
}
