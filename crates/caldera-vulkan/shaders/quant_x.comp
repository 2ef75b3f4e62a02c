#version 450
// Quantizes an f32 vector for the int8-dot mat-vecs (mvq.glsl): blocks of 32 values v,
// d = max|v| / 127, q = roundEven(v * 127 / max|v|) (int8, packed 4 to a word,
// little-endian); v = x, or x * gam / rms(x) with QX_NORM (every workgroup takes the
// sum of squares over the whole vector itself). One invocation per block.
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
    uint b = flat_group() * WG + tid;
    if (b >= p.k / 32u) {
        return;
    }
    vec4 v[8];
    float amax = 0.0;
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        vec4 t = x4[8u * b + i];
        if (norm) {
            t = t * inv * gam4[8u * b + i];
        }
        v[i] = t;
        vec4 a = abs(t);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        ivec4 t = clamp(ivec4(roundEven(v[i] * id)), ivec4(-127), ivec4(127));
        uvec4 u = uvec4(t) & 255u;
        q[8u * b + i] = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
    }
    dq[b] = amax / 127.0;
}
