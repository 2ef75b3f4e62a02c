#version 450
// Q4_K (144 B / 256 elements): d: f16, dmin: f16, scales[12], qs[128]. 8 groups of 32
// with six-bit scale sc and min mn; element e = 64j + r is the low nibble of
// qs[32j + r] (r < 32, group 2j) or the high nibble of qs[32j + r - 32] (group 2j + 1);
// value d * sc * q - dmin * mn. One invocation step covers one (block, j): 64 elements.
#include "matvec_head.glsl"

// Six-bit scale and min of group g (0..8); `s` is the byte offset of scales[0].
uvec2 scale_min_k4(uint g, uint s) {
    if (g < 4u) {
        return uvec2(byte_at(s + g) & 63u, byte_at(s + g + 4u) & 63u);
    }
    uint a = byte_at(s + g + 4u);
    return uvec2((a & 15u) | ((byte_at(s + g - 4u) >> 6) << 4),
                 (a >> 4) | ((byte_at(s + g) >> 6) << 4));
}

float row_dot(uint row, uint tid) {
    uint nb = p.k / 256u;
    uint base = row * nb * 144u;
    float acc = 0.0;
    for (uint u = tid; u < nb * 4u; u += WG) {
        uint b = u >> 2;
        uint j = u & 3u;
        uint o = base + b * 144u;
        vec2 dm = unpackHalf2x16(u32_at(o));
        uvec2 sm0 = scale_min_k4(2u * j, o + 4u);
        uvec2 sm1 = scale_min_k4(2u * j + 1u, o + 4u);
        uint xo = p.x_offset + b * 256u + 64u * j;
        float qx0 = 0.0, qx1 = 0.0, sx0 = 0.0, sx1 = 0.0;
        [[unroll]] for (uint t = 0; t < 8u; t++) {
            uint q = u32_at(o + 16u + 32u * j + 4u * t);
            [[unroll]] for (uint c = 0; c < 4u; c++) {
                uint v = (q >> (8u * c)) & 0xffu;
                uint i = xo + 4u * t + c;
                float a0 = x[i];
                float a1 = x[i + 32u];
                qx0 += float(v & 15u) * a0;
                sx0 += a0;
                qx1 += float(v >> 4) * a1;
                sx1 += a1;
            }
        }
        acc += dm.x * (float(sm0.x) * qx0 + float(sm1.x) * qx1)
             - dm.y * (float(sm0.y) * sx0 + float(sm1.y) * sx1);
    }
    return acc;
}

#include "matvec_main.glsl"
