// The KV cache (binding 1: k, binding 2: v; layout [pos][kv head][hd]) in f32 or, with
// KV16 (specialization constant 2), f16: two values per 32-bit word, element e in the
// low half of word e / 2 when e is even. Readers take it a value or 4 values (e a
// multiple of 4) at a time; writers store pairs (e even).
layout(constant_id = 2) const bool KV16 = false;

layout(std430, binding = 1) buffer KcF { float kc_f[]; };
layout(std430, binding = 1) buffer KcH { uint kc_h[]; };
layout(std430, binding = 1) readonly buffer KcF4 { vec4 kc_f4[]; };
layout(std430, binding = 1) readonly buffer KcH2 { uvec2 kc_h2[]; };
layout(std430, binding = 2) buffer VcF { float vc_f[]; };
layout(std430, binding = 2) buffer VcH { uint vc_h[]; };
layout(std430, binding = 2) readonly buffer VcF4 { vec4 vc_f4[]; };
layout(std430, binding = 2) readonly buffer VcH2 { uvec2 vc_h2[]; };

float k_at(uint e) {
    return KV16 ? unpackHalf2x16(kc_h[e >> 1])[e & 1u] : kc_f[e];
}
float v_at(uint e) {
    return KV16 ? unpackHalf2x16(vc_h[e >> 1])[e & 1u] : vc_f[e];
}
// Elements 4 * e4 .. 4 * e4 + 4.
vec4 k4_at(uint e4) {
    if (KV16) {
        uvec2 w = kc_h2[e4];
        return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
    }
    return kc_f4[e4];
}
vec4 v4_at(uint e4) {
    if (KV16) {
        uvec2 w = vc_h2[e4];
        return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
    }
    return vc_f4[e4];
}
// Elements e, e + 1 (e even).
void k_put2(uint e, vec2 v) {
    if (KV16) {
        kc_h[e >> 1] = packHalf2x16(v);
    } else {
        kc_f[e] = v.x;
        kc_f[e + 1u] = v.y;
    }
}
void v_put2(uint e, vec2 v) {
    if (KV16) {
        vc_h[e >> 1] = packHalf2x16(v);
    } else {
        vc_f[e] = v.x;
        vc_f[e + 1u] = v.y;
    }
}
