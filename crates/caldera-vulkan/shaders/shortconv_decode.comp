#version 450
// Short-conv (LFM2) decode step for one token: bx = B * x, a causal depthwise conv of
// bx over the state's K - 1 earlier inputs, out = C * conv. One invocation per channel;
// caldera-cpu/src/shortconv.rs defines it.
// Binding 0: proj (f32: B [c] | C [c] | x [c], in_proj's rows), 1: constants (f32: conv
// taps [c][K] | conv bias [c]), 2: state ([K - 1][c], oldest row first, as the CPU's),
// 3: out (f32, c).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer State { float st[]; };
layout(std430, binding = 3) writeonly buffer Out { float o[]; };

layout(push_constant) uniform Push {
    uint channels;
    uint kern;
} p;

void main() {
    uint ch = flat_group() * WG + gl_LocalInvocationID.x;
    uint n = p.channels;
    if (ch >= n) {
        return;
    }
    uint k = p.kern;
    float bx = proj[ch] * proj[2u * n + ch];
    float acc = par[n * k + ch];
    for (uint i = 0u; i + 1u < k; i++) {
        acc += par[ch * k + i] * st[i * n + ch];
    }
    acc += par[ch * k + k - 1u] * bx;
    if (k > 1u) {
        for (uint i = 0u; i + 2u < k; i++) {
            st[i * n + ch] = st[(i + 1u) * n + ch];
        }
        st[(k - 2u) * n + ch] = bx;
    }
    o[ch] = proj[n + ch] * acc;
}
