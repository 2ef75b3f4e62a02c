#version 450
// GatedDeltaNet prefill, part 3 of 3: the gated RMSNorm o = rmsnorm(o) * norm * silu(z)
// in place, one workgroup per (token, value head) of the m = step[0] tokens.
// Binding 0: proj rows (f32, [m][ld]: z at conv_dim), 1: constants (gdn_decode's),
// 2: out (f32, [m][n_v * dv], rw), 3: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer Out { float o[]; };
layout(std430, binding = 3) readonly buffer Sbuf { uint step[]; };

#include "act.glsl"

layout(push_constant) uniform Push {
    uint n_v;
    uint dv;
    uint cd;
    uint ld;
    uint norm_at; // offset of the norm weights in the constants
    float eps;
} p;

void main() {
    uint grp = flat_group();
    uint t = grp / p.n_v;
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint j = grp % p.n_v;
    uint tid = gl_LocalInvocationID.x;
    uint ob = t * p.n_v * p.dv + j * p.dv;
    float ss = 0.0;
    for (uint c = tid; c < p.dv; c += WG) {
        ss += o[ob + c] * o[ob + c];
    }
    ss = reduce_sum(ss);
    float inv = inversesqrt(ss / float(p.dv) + p.eps);
    uint zb = t * p.ld + p.cd + j * p.dv;
    for (uint c = tid; c < p.dv; c += WG) {
        o[ob + c] = o[ob + c] * inv * par[p.norm_at + c] * silu(proj[zb + c]);
    }
}
