// The KV cache (binding 1: k, binding 2: v). Its values are addressed as elements of
// [row][kv head][hd] (element e; rows are the pages' positions, see Paging below),
// stored as KV_TYPE (specialization constant 2) says:
// - KV_F32: element e is float e.
// - KV_F16: two values per 32-bit word, element e in the low half of word e / 2 when e
//   is even.
// - KV_Q8 (q8_0, hd a multiple of 32): blocks of 32 elements, so a block lies inside one
//   (pos, kv head) row; block b = e / 32 is the 9 words 9b .. 9b + 8 (36 bytes): word 9b
//   its scale d (f32), word 9b + 1 + j elements 32b + 4j .. 32b + 4j + 3 as int8 q (the
//   first in the low byte); the value is q * d. A block is written whole (kv_put32):
//   d = amax / 127, q = clamp(roundEven(x * (127 / amax)), -127, 127), quant_x.comp's
//   rounding; a block of zeros has d = 0.
// Readers take a value or 4 values (e a multiple of 4) at a time. Writers store pairs
// (f32, f16; e even) or whole blocks (q8_0).
//
// Paging: the cache is a pool of pages of KV_PAGE positions, [row][kv head][hd] with row
// = page * KV_PAGE + offset, and a sequence's position p lives in row
// kv_row(p) = kv_table[KV_TB + p / KV_PAGE] * KV_PAGE + p % KV_PAGE: kv_table (binding
// KV_TABLE_BINDING, which the including kernel defines: its last binding) is the page
// table (u32 page ids), KV_TB the sequence's first entry (0, or a batched kernel's column's
// slot * entries per slot). A runner with a cache of its own binds the identity table.
// Kernels look pages up once per position tile where they can, never per element.
const uint KV_PAGE = 16u;
const uint KV_PAGE_SHIFT = 4u;
layout(std430, binding = KV_TABLE_BINDING) readonly buffer KvTable { uint kv_table[]; };
uint KV_TB = 0u;
uint kv_page(uint pos) {
    return kv_table[KV_TB + (pos >> KV_PAGE_SHIFT)];
}
uint kv_row(uint pos) {
    return kv_page(pos) * KV_PAGE + (pos & (KV_PAGE - 1u));
}
const uint KV_F32 = 0u;
const uint KV_F16 = 1u;
const uint KV_Q8 = 2u;
layout(constant_id = 2) const uint KV_TYPE = KV_F32;

layout(std430, binding = 1) buffer KcF { float kc_f[]; };
layout(std430, binding = 1) buffer KcH { uint kc_h[]; };
layout(std430, binding = 1) readonly buffer KcF4 { vec4 kc_f4[]; };
layout(std430, binding = 1) readonly buffer KcH2 { uvec2 kc_h2[]; };
layout(std430, binding = 2) buffer VcF { float vc_f[]; };
layout(std430, binding = 2) buffer VcH { uint vc_h[]; };
layout(std430, binding = 2) readonly buffer VcF4 { vec4 vc_f4[]; };
layout(std430, binding = 2) readonly buffer VcH2 { uvec2 vc_h2[]; };

// q8_0: the 4 int8 values of word w times d.
vec4 kv_q8_4(uint w, float d) {
    ivec4 q = ivec4(int(w << 24), int(w << 16), int(w << 8), int(w)) >> 24;
    return vec4(q) * d;
}
// q8_0: byte i (0..3) of word w times d.
float kv_q8_1(uint w, uint i, float d) {
    return float(bitfieldExtract(int(w), int(8u * i), 8)) * d;
}

float k_at(uint e) {
    if (KV_TYPE == KV_Q8) {
        uint b = 9u * (e >> 5);
        return kv_q8_1(kc_h[b + 1u + ((e & 31u) >> 2)], e & 3u, uintBitsToFloat(kc_h[b]));
    }
    return KV_TYPE == KV_F16 ? unpackHalf2x16(kc_h[e >> 1])[e & 1u] : kc_f[e];
}
float v_at(uint e) {
    if (KV_TYPE == KV_Q8) {
        uint b = 9u * (e >> 5);
        return kv_q8_1(vc_h[b + 1u + ((e & 31u) >> 2)], e & 3u, uintBitsToFloat(vc_h[b]));
    }
    return KV_TYPE == KV_F16 ? unpackHalf2x16(vc_h[e >> 1])[e & 1u] : vc_f[e];
}
// Elements 4 * e4 .. 4 * e4 + 4.
vec4 k4_at(uint e4) {
    if (KV_TYPE == KV_Q8) {
        uint b = 9u * (e4 >> 3);
        return kv_q8_4(kc_h[b + 1u + (e4 & 7u)], uintBitsToFloat(kc_h[b]));
    }
    if (KV_TYPE == KV_F16) {
        uvec2 w = kc_h2[e4];
        return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
    }
    return kc_f4[e4];
}
vec4 v4_at(uint e4) {
    if (KV_TYPE == KV_Q8) {
        uint b = 9u * (e4 >> 3);
        return kv_q8_4(vc_h[b + 1u + (e4 & 7u)], uintBitsToFloat(vc_h[b]));
    }
    if (KV_TYPE == KV_F16) {
        uvec2 w = vc_h2[e4];
        return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
    }
    return vc_f4[e4];
}
// Elements e, e + 1 (e even; f32 and f16 only).
void k_put2(uint e, vec2 v) {
    if (KV_TYPE == KV_F16) {
        kc_h[e >> 1] = packHalf2x16(v);
    } else {
        kc_f[e] = v.x;
        kc_f[e + 1u] = v.y;
    }
}
void v_put2(uint e, vec2 v) {
    if (KV_TYPE == KV_F16) {
        vc_h[e >> 1] = packHalf2x16(v);
    } else {
        vc_f[e] = v.x;
        vc_f[e + 1u] = v.y;
    }
}
// q8_0: quantizes x, the 32 values of the block at element e (a multiple of 32), into
// the v cache (is_v) or the k cache.
void kv_put32(bool is_v, uint e, vec4 x[8]) {
    float amax = 0.0;
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        vec4 a = abs(x[j]);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    uint b = 9u * (e >> 5);
    uint d = floatBitsToUint(amax / 127.0);
    if (is_v) {
        vc_h[b] = d;
    } else {
        kc_h[b] = d;
    }
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        ivec4 t = clamp(ivec4(roundEven(x[j] * id)), ivec4(-127), ivec4(127));
        uvec4 u = uvec4(t) & 255u;
        uint w = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
        if (is_v) {
            vc_h[b + 1u + j] = w;
        } else {
            kc_h[b + 1u + j] = w;
        }
    }
}
