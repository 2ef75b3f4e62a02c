#version 450
// Gemma 4's per-layer inputs of a step's tokens, in place: for token t and layer l,
// row r = pli[t * n_layers * dpl + l * dpl ..][..dpl] (the model projection of the
// token's embedding) becomes
//   (rmsnorm(r * proj_scale) * norm + tok[same] * tok_scale) * input_scale,
// tok being the token's per-layer embedding row. One workgroup per (t, l).
// Binding 0: pli (f32, rw), 1: tok (f32, same layout), 2: norm (f32, dpl),
// 3: step values ([0] tokens).
#include "common.glsl"

layout(std430, binding = 0) buffer Pli { float pli[]; };
layout(std430, binding = 1) readonly buffer Tok { float tok[]; };
layout(std430, binding = 2) readonly buffer Norm { float nw[]; };
layout(std430, binding = 3) readonly buffer Step { uint step[]; };

layout(push_constant) uniform Push {
    uint n_layers;
    uint dpl;
    float eps;
    float proj_scale;
    float tok_scale;
    float input_scale;
} p;

void main() {
    uint grp = flat_group();
    uint t = grp / p.n_layers;
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = grp * p.dpl;
    float ss = 0.0;
    for (uint i = tid; i < p.dpl; i += WG) {
        float v = pli[base + i] * p.proj_scale;
        ss += v * v;
    }
    ss = reduce_sum(ss);
    float inv = inversesqrt(ss / float(p.dpl) + p.eps);
    for (uint i = tid; i < p.dpl; i += WG) {
        float v = pli[base + i] * p.proj_scale * inv * nw[i];
        pli[base + i] = (v + tok[base + i] * p.tok_scale) * p.input_scale;
    }
}
