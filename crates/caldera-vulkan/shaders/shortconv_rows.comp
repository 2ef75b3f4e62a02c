#version 450
// Short-conv (LFM2) prefill: shortconv_decode over the m = step[0] tokens of a step, one
// invocation per channel running through every token, then the state's last K - 1
// inputs B * x. Binding 0: proj rows (f32, [m][ld]: B | C | x), 1: constants
// (shortconv_decode's), 2: state ([K - 1][c], oldest row first), 3: out (f32, [m][c]),
// 4: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer State { float st[]; };
layout(std430, binding = 3) writeonly buffer Out { float o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint channels;
    uint kern;
    uint ld;
    uint max_t; // rows the buffers hold (step[0] beyond it is clamped)
} p;

// B * x of token t.
float bx(uint t, uint ch) {
    return proj[t * p.ld + ch] * proj[t * p.ld + 2u * p.channels + ch];
}

void main() {
    uint ch = flat_group() * WG + gl_LocalInvocationID.x;
    uint n = p.channels;
    if (ch >= n) {
        return;
    }
    uint k = p.kern;
    uint hist = k - 1u;
    uint m = min(step[0], p.max_t);
    for (uint t = 0u; t < m; t++) {
        float acc = par[n * k + ch];
        for (uint i = 0u; i < k; i++) {
            uint back = hist - i; // the input `back` tokens before t
            float v = t >= back ? bx(t - back, ch) : st[(hist - back + t) * n + ch];
            acc += par[ch * k + i] * v;
        }
        o[t * n + ch] = proj[t * p.ld + n + ch] * acc;
    }
    // The new history: the last K - 1 of [old history; the step's inputs]. Row r takes
    // entry m + r, always past every row written before it, so in place is safe.
    for (uint r = 0u; r < hist; r++) {
        uint e = m + r;
        st[r * n + ch] = e < hist ? st[e * n + ch] : bx(e - hist, ch);
    }
}
