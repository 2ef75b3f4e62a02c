#version 450
// Mamba2 prefill, part 3 of 3: the RMSNorm of each group of gs = d_inner / G gated
// outputs, times the norm weights, in place; one workgroup per (token, group) of the
// m = step[0] tokens.
// Binding 0: constants (mamba2_decode's), 1: out (f32, [m][d_inner], rw), 2: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Par { float par[]; };
layout(std430, binding = 1) buffer Out { float y[]; };
layout(std430, binding = 2) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint n_g;
    uint gs;
    uint norm_at; // offset of the norm weights in the constants
    float eps;
} p;

void main() {
    uint grp = flat_group();
    uint t = grp / p.n_g;
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint g = grp % p.n_g;
    uint tid = gl_LocalInvocationID.x;
    uint base = t * p.n_g * p.gs + g * p.gs;
    float ss = 0.0;
    for (uint i = tid; i < p.gs; i += WG) {
        ss += y[base + i] * y[base + i];
    }
    ss = reduce_sum(ss);
    float inv = inversesqrt(ss / float(p.gs) + p.eps);
    for (uint i = tid; i < p.gs; i += WG) {
        y[base + i] *= inv * par[p.norm_at + g * p.gs + i];
    }
}
