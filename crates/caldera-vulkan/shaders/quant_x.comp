#version 450
// Quantizes an f32 vector for the int8-dot mat-vecs (mvq.glsl): blocks of 32 values v,
// d = max|v| / 127, q = roundEven(v * 127 / max|v|) (int8, packed 4 to a word,
// little-endian); v = x, or x * gam / rms(x) with QX_NORM (every workgroup takes the
// sum of squares over the whole vector itself). Eight invocations per block, 4 values
// each (WG >= 8).
// Binding 0: x (f32, k; k a multiple of 32), 1: gam (f32, k; any buffer of >= k floats
// without QX_NORM), 2: q (u32, k / 4), 3: d (f32, k / 32).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Xbuf { vec4 x4[]; };
layout(std430, binding = 1) readonly buffer Gbuf { vec4 gam4[]; };
layout(std430, binding = 2) writeonly buffer Qbuf { uint q[]; };
layout(std430, binding = 3) writeonly buffer Dbuf { float dq[]; };

const uint QX_NORM = 1u;

layout(push_constant) uniform Push {
    uint k;
    uint flags;
    float eps;
} p;

shared float mx_s[WG];

void main() {
    uint tid = gl_LocalInvocationID.x;
    bool norm = (p.flags & QX_NORM) != 0u;
    float inv = 1.0;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < p.k / 4u; i += WG) {
            vec4 v = x4[i];
            ss += dot(v, v);
        }
        ss = reduce_sum(ss);
        inv = inversesqrt(ss / float(p.k) + p.eps);
    }
    // Invocation i takes values 4i .. 4i + 4; the 8 of a block meet through shared memory.
    uint i = flat_group() * WG + tid;
    bool live = i < p.k / 4u;
    vec4 v = vec4(0.0);
    if (live) {
        v = x4[i];
        if (norm) {
            v = v * inv * gam4[i];
        }
    }
    vec4 av = abs(v);
    mx_s[tid] = max(max(av.x, av.y), max(av.z, av.w));
    barrier();
    uint first = tid & ~7u;
    float amax = 0.0;
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        amax = max(amax, mx_s[first + j]);
    }
    if (!live) {
        return;
    }
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    ivec4 t = clamp(ivec4(roundEven(v * id)), ivec4(-127), ivec4(127));
    uvec4 u = uvec4(t) & 255u;
    q[i] = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
    if ((i & 7u) == 0u) {
        dq[i / 8u] = amax / 127.0;
    }
}
