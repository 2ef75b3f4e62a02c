#version 450
// Elementwise over the rows of a step's tokens (t < min(step[0], max_t)), y[t * ld_y + i]
// for i < n:
//   mode 0 (relu²):  y = max(y, 0)²   (the ungated MLP of Nemotron-H, between its up and
//                    down projections)
//   mode 1 (gate):   y *= sigmoid(src[t * ld_src + src_off + i])   (Qwen3.5's gated
//                    attention output: src is the q|k|v|gate rows, src_off the gates')
// Binding 0: y (f32, rw), 1: src (f32; any buffer in mode 0), 2: step values ([0] tokens).
// Dispatch: max_t * ceil(n / WG) workgroups, token-major.
#include "common.glsl"

layout(std430, binding = 0) buffer Ybuf { float y[]; };
layout(std430, binding = 1) readonly buffer Sbuf { float src[]; };
layout(std430, binding = 2) readonly buffer Step { uint step[]; };

layout(push_constant) uniform Push {
    uint n;
    uint ld_y;
    uint ld_src;
    uint src_off;
    uint mode;
    uint max_t;
} p;

void main() {
    uint per = (p.n + WG - 1u) / WG;
    uint grp = flat_group();
    uint t = grp / per;
    uint i = (grp % per) * WG + gl_LocalInvocationID.x;
    if (t >= min(step[0], p.max_t) || i >= p.n) {
        return;
    }
    uint yi = t * p.ld_y + i;
    float v = y[yi];
    if (p.mode == 0u) {
        v = max(v, 0.0);
        v *= v;
    } else {
        v /= 1.0 + exp(-src[t * p.ld_src + p.src_off + i]);
    }
    y[yi] = v;
}
