#version 450
// A mixture of experts' output added to the residual stream, for every token t of a step
// (t < min(step[0], max_t)):
//   x[t * d + i] += sum over slots e < n_slots of wt(t, e) * y[t * n_slots * d + e * d + i]
// where slot e < n_exp is expert e's down projection, weighted by its mixing weight
// w[t * n_exp + e] (moe_route.comp; experts not chosen weigh 0 and are skipped), and
// slots from n_exp on (the shared expert) weigh 1.
// Binding 0: x (f32, rw), 1: y (f32), 2: w (f32), 3: step values ([0] tokens).
// Dispatch: max_t * ceil(d / WG) workgroups, token-major.
#include "common.glsl"

layout(std430, binding = 0) buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Ybuf { float y[]; };
layout(std430, binding = 2) readonly buffer Wbuf { float w[]; };
layout(std430, binding = 3) readonly buffer Step { uint step[]; };

layout(push_constant) uniform Push {
    uint d;
    uint n_exp;
    uint n_slots;
    uint max_t;
} p;

void main() {
    uint per = (p.d + WG - 1u) / WG;
    uint grp = flat_group();
    uint t = grp / per;
    uint i = (grp % per) * WG + gl_LocalInvocationID.x;
    if (t >= min(step[0], p.max_t) || i >= p.d) {
        return;
    }
    uint yb = t * p.n_slots * p.d + i;
    float acc = 0.0;
    for (uint e = 0u; e < p.n_slots; e++) {
        float wt = e < p.n_exp ? w[t * p.n_exp + e] : 1.0;
        if (wt != 0.0) {
            acc += wt * y[yb + e * p.d];
        }
    }
    x[t * p.d + i] += acc;
}
