#version 450
// RMSNorm of `rows` rows of n values: y[r][i] = x[r][i] / sqrt(mean(x[r]^2) + eps) * w[i].
// Binding 0: x (f32, rows * n), 1: w (f32, n), 2: y (f32, rows * n; may alias nothing).
// One workgroup per row.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Wbuf { float w[]; };
layout(std430, binding = 2) writeonly buffer Ybuf { float y[]; };

layout(push_constant) uniform Push {
    uint n;
    uint rows;
    float eps;
} p;

void main() {
    uint row = flat_group();
    if (row >= p.rows) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = row * p.n;
    float ss = 0.0;
    for (uint i = tid; i < p.n; i += WG) {
        float v = x[base + i];
        ss += v * v;
    }
    ss = reduce_sum(ss);
    float scale = inversesqrt(ss / float(p.n) + p.eps);
    for (uint i = tid; i < p.n; i += WG) {
        y[base + i] = x[base + i] * scale * w[i];
    }
}
