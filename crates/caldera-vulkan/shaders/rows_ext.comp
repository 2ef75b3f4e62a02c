#version 450
// Elementwise over the rows of a step's tokens (t < min(step[0], max_t)),
// y[t * ld_y + y_off + i] for i < n (a sibling of rows_act.comp):
//   mode 0 (bias):  y += src[i]                          (biased projections, gpt-oss)
//   mode 1 (scale): y *= scale                           (Gemma 4's layer output scale)
//   mode 2 (gelu):  y = gelu_tanh(y) * src[t * ld_src + src_off + i]
//                   (Gemma 4's per-layer input gate: src holds the per-layer inputs)
//   mode 3 (select): y = src[(step[2] + t) * ld_src + src_off + i]
//                   (the rows of the tokens whose logits are wanted, from step[2] on:
//                   a prefill step's one selected row for the LM head's mat-vec)
// Binding 0: y (f32, rw), 1: src (f32; any buffer in mode 1), 2: step values ([0] tokens,
// [2] the first token whose logits are wanted).
// Dispatch: max_t * ceil(n / WG) workgroups, token-major.
#include "common.glsl"
#include "act.glsl"

layout(std430, binding = 0) buffer Ybuf { float y[]; };
layout(std430, binding = 1) readonly buffer Sbuf { float src[]; };
layout(std430, binding = 2) readonly buffer Step { uint step[]; };

layout(push_constant) uniform Push {
    uint n;
    uint ld_y;
    uint y_off;
    uint ld_src;
    uint src_off;
    uint mode;
    uint max_t;
    float scale;
} p;

void main() {
    uint per = (p.n + WG - 1u) / WG;
    uint grp = flat_group();
    uint t = grp / per;
    uint i = (grp % per) * WG + gl_LocalInvocationID.x;
    if (t >= min(step[0], p.max_t) || i >= p.n) {
        return;
    }
    uint yi = t * p.ld_y + p.y_off + i;
    float v = y[yi];
    if (p.mode == 0u) {
        v += src[i];
    } else if (p.mode == 1u) {
        v *= p.scale;
    } else if (p.mode == 2u) {
        v = gelu_tanh(v) * src[t * p.ld_src + p.src_off + i];
    } else {
        v = src[(step[2] + t) * p.ld_src + p.src_off + i];
    }
    y[yi] = v;
}
