#version 450
// The routed experts' share of a step's MoE block, into the residual stream: for every
// token t < step[0] and output r < d, x[t d + r] += Σ_s yd[(t k + s) d + r], the slots in
// order (the grouped down projection wrote each pair's output times its routing weight
// into yd), so the sum is deterministic and needs no atomics.
// With `with_shared`, then the shared expert's output ys[t d + r] (its weight applied) too.
// One invocation per (token, output) of the tokens the scratch holds (flat 2D dispatch).
// Binding 0: x (f32, read-write). 1: yd (f32). 2: step values (u32). 3: ys (f32; any
// buffer without `with_shared`).
layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Ybuf { float yd[]; };
layout(std430, binding = 2) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 3) readonly buffer YSbuf { float ys[]; };

layout(push_constant) uniform Push {
    uint d;
    uint k;
    uint with_shared;
} p;

void main() {
    uint i = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * 256u
        + gl_LocalInvocationID.x;
    uint t = i / p.d;
    uint r = i % p.d;
    if (t >= step[0]) {
        return;
    }
    float s = 0.0;
    for (uint j = 0u; j < p.k; j++) {
        s += yd[(t * p.k + j) * p.d + r];
    }
    float v = x[i] + s;
    if (p.with_shared != 0u) {
        v += ys[i];
    }
    x[i] = v;
}
