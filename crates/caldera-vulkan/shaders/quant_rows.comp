#version 450
// Quantizes the rows of a batched decode step (row r < step[0], ld_x floats apart) for
// the int8 mat-vecs (mvqn.glsl), each as quant_x.comp quantizes one vector: blocks of
// 32 values v, d = max|v| / 127, q = roundEven(v * 127 / max|v|); row r's blocks at
// r * k / 32. v = x, or x * gam / rms(x) with QR_NORM (each workgroup takes its row's
// sum of squares itself), or act(x[2i]) * x[2i + 1] with QR_SILU / QR_GELU (rows of
// (gate, up) pairs, as the interleaved gate|up weight writes them). Eight invocations
// per block, 4 values each (WG >= 8). Workgroup g: row g / gpr, values of its part
// g % gpr. With QR_SUMS it also writes each block's sum of its int8 values (i32, at
// the block's index of d) for the batched mat-vecs (mvqn.glsl, MVN_SUMS).
// Binding 0: x (f32), 1: gam (f32, k; any buffer without QR_NORM), 2: q (u32), 3: d
// (f32), 4: step values ([0] rows), 5: block sums (i32; any buffer without QR_SUMS).
#include "common.glsl"
#include "act.glsl"

layout(std430, binding = 0) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 0) readonly buffer Xbuf4 { vec4 x4[]; };
layout(std430, binding = 1) readonly buffer Gbuf { vec4 gam4[]; };
layout(std430, binding = 2) writeonly buffer Qbuf { uint q[]; };
layout(std430, binding = 3) writeonly buffer Dbuf { float dq[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) writeonly buffer QSbuf { int qsum[]; };

const uint QR_NORM = 1u;
const uint QR_SILU = 2u;
const uint QR_GELU = 4u;
const uint QR_SUMS = 8u;

layout(push_constant) uniform Push {
    uint k;     // values per row (a multiple of 32)
    uint flags;
    float eps;
    uint ld_x;  // floats between rows of x (a multiple of 4)
    uint gpr;   // workgroups per row
} p;

shared float mx_s[WG];
shared int sum_s[WG];

vec4 value4(uint xb, uint i) {
    if ((p.flags & (QR_SILU | QR_GELU)) != 0u) {
        vec4 v;
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            float g = x[xb + 2u * (4u * i + j)];
            float u = x[xb + 2u * (4u * i + j) + 1u];
            v[j] = ((p.flags & QR_GELU) != 0u ? gelu_tanh(g) : silu(g)) * u;
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
    bool norm = (p.flags & QR_NORM) != 0u;
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
    bool live = i < p.k / 4u;
    vec4 v = vec4(0.0);
    if (live) {
        v = value4(xb, i);
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
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    ivec4 t = clamp(ivec4(roundEven(v * id)), ivec4(-127), ivec4(127));
    uint qi = row * (p.k / 4u) + i;
    if ((p.flags & QR_SUMS) != 0u) { // uniform
        // (A block's 8 invocations are all live or all not: k is whole blocks.)
        sum_s[tid] = t.x + t.y + t.z + t.w;
        barrier();
        if (live && (i & 7u) == 0u) {
            int s = 0;
            [[unroll]] for (uint j = 0u; j < 8u; j++) {
                s += sum_s[first + j];
            }
            qsum[qi / 8u] = s;
        }
    }
    if (!live) {
        return;
    }
    uvec4 u = uvec4(t) & 255u;
    q[qi] = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
    if ((i & 7u) == 0u) {
        dq[qi / 8u] = amax / 127.0;
    }
}
