#version 450
#extension GL_EXT_control_flow_attributes : enable
// MoE router, one workgroup per token t of the step: from token t's router logits (n
// experts, written by a mat-vec) choose k experts and their mixing weights (route.glsl,
// as caldera-cpu's `ffn::route`, for every router kind).
// One workgroup of 128 per token; n <= MAXE, k <= MAXK. Token t reads logits row t (ld
// values apart) and writes entries t (k + shared) ..; a token past the step's (t >=
// step[0]) gets ids 0xffffffff, which the expert mat-vecs skip.
// Binding 0: logits (f32, n, n + 1 with ROUTE_SHARED_GATE). 1: logit bias (f32, n; any
// buffer without ROUTE_LOGIT_BIAS). 2: selection bias (f32, n; any buffer without
// ROUTE_SEL_BIAS). 3: ids (u32, k (+ 1) per token). 4: weights (f32, the same).
// 5: step values (u32; step[0] = tokens in the step).

layout(local_size_x = 128, local_size_y = 1, local_size_z = 1) in;
const uint RWG = 128u;

layout(std430, binding = 0) readonly buffer Lbuf { float logits[]; };
layout(std430, binding = 1) readonly buffer LBbuf { float lbias[]; };
layout(std430, binding = 2) readonly buffer SBbuf { float sbias[]; };
layout(std430, binding = 3) writeonly buffer Ibuf { uint ids[]; };
layout(std430, binding = 4) writeonly buffer Wbuf { float wts[]; };
layout(std430, binding = 5) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint n;
    uint k;
    uint kind;
    uint flags;
    float scale;
    uint ld; // logits values between tokens
} p;

float route_logit(uint i) {
    return logits[gl_WorkGroupID.x * p.ld + i];
}

#include "route.glsl"

void main() {
    uint t = gl_LocalInvocationID.x;
    uint tok = gl_WorkGroupID.x;
    uint per = p.k + ((p.flags & ROUTE_SHARED) != 0u ? 1u : 0u);
    uint out0 = tok * per;
    if (tok >= step[0]) {
        for (uint j = t; j < per; j += RWG) {
            ids[out0 + j] = NONE;
            wts[out0 + j] = 0.0;
        }
        return;
    }
    route_token(p.n, p.k, p.kind, p.flags, p.scale, out0);
}
