#version 450
// The inputs of a batched decode step as f16, for the cooperative-matrix mat-vec
// (mvc.glsl): row r < step[0] of x (ld_x floats apart) into k halves at r * k of out,
// each group of 4 in the order 0, 2, 1, 3 (as mvc.glsl's weight tiles: the order in
// which its f16 decoders make them, two at a time).
// v = x, or x * gam / rms(x) with HR_NORM (each workgroup takes its row's sum of
// squares itself), or act(x[2i]) * x[2i + 1] with HR_SILU / HR_GELU (rows of (gate, up)
// pairs, as the interleaved gate|up weight writes them). Magnitudes past 65504 become
// infinities, as in other engines' f16 matmuls. Four values per invocation; workgroup
// g: row g / gpr, values of its part g % gpr.
// Binding 0: x (f32), 1: gam (f32, k; any buffer without HR_NORM), 2: out (2 words per
// 4 values), 3: step values ([0] rows).
#include "common.glsl"
#include "act.glsl"

layout(std430, binding = 0) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 0) readonly buffer Xbuf4 { vec4 x4[]; };
layout(std430, binding = 1) readonly buffer Gbuf { vec4 gam4[]; };
layout(std430, binding = 2) writeonly buffer Obuf { uvec2 o2[]; };
layout(std430, binding = 3) readonly buffer Sbuf { uint step[]; };

const uint HR_NORM = 1u;
const uint HR_SILU = 2u;
const uint HR_GELU = 4u;

layout(push_constant) uniform Push {
    uint k;     // values per row (a multiple of 4)
    uint flags;
    float eps;
    uint ld_x;  // floats between rows of x (a multiple of 4)
    uint gpr;   // workgroups per row
} p;

vec4 value4(uint xb, uint i) {
    if ((p.flags & (HR_SILU | HR_GELU)) != 0u) {
        vec4 v;
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            float g = x[xb + 2u * (4u * i + j)];
            float u = x[xb + 2u * (4u * i + j) + 1u];
            v[j] = ((p.flags & HR_GELU) != 0u ? gelu_tanh(g) : silu(g)) * u;
        }
        return v;
    }
    return x4[xb / 4u + i];
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint grp = flat_group();
    uint row = grp / p.gpr;
    if (row >= step[0]) {
        return; // uniform for the workgroup
    }
    uint xb = row * p.ld_x;
    bool norm = (p.flags & HR_NORM) != 0u;
    float inv = 1.0;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < p.k / 4u; i += WG) {
            vec4 v = x4[xb / 4u + i];
            ss += dot(v, v);
        }
        ss = reduce_sum(ss);
        inv = inversesqrt(ss / float(p.k) + p.eps);
    }
    uint i = (grp % p.gpr) * WG + tid;
    if (i >= p.k / 4u) {
        return;
    }
    vec4 v = value4(xb, i);
    if (norm) {
        v = v * inv * gam4[i];
    }
    // Each quad as (v0, v2), (v1, v3): the order mvc.glsl's tiles hold the weights in.
    o2[row * (p.k / 4u) + i] = uvec2(packHalf2x16(v.xz), packHalf2x16(v.yw));
}
