#version 450
// x[t] += rmsnorm(r[t]) * w for every token t of a step (Gemma's post-norms):
// one workgroup per token.
// Binding 0: x (f32, rw), 1: r (f32), 2: w (f32, n), 3: step values ([0] tokens).
#include "common.glsl"

layout(std430, binding = 0) buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Rbuf { float r[]; };
layout(std430, binding = 2) readonly buffer Wbuf { float w[]; };
layout(std430, binding = 3) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint n;
    float eps;
} p;

void main() {
    uint t = flat_group();
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = t * p.n;
    float ss = 0.0;
    for (uint i = tid; i < p.n; i += WG) {
        float v = r[base + i];
        ss += v * v;
    }
    ss = reduce_sum(ss);
    float inv = inversesqrt(ss / float(p.n) + p.eps);
    for (uint i = tid; i < p.n; i += WG) {
        x[base + i] += r[base + i] * inv * w[i];
    }
}
