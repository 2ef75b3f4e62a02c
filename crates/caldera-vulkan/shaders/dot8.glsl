// The int8 dot products of the decode mat-vecs on int8 activations (mvq.glsl, mvqn.glsl):
// sdot (signed x signed bytes) and udot (unsigned x signed), through OpSDot / OpSUDot
// (SPV_KHR_integer_dot_product) with USE_DOT = 1, plain integer arithmetic otherwise;
// byte masks; and the per-block-slot activation registers the block readers share.
// Needs `#extension GL_EXT_spirv_intrinsics : require` in the includer with USE_DOT.
#if USE_DOT
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot_packed(uint a, uint b, spirv_literal int fmt);
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4452)
int sudot_packed(uint a, uint b, spirv_literal int fmt);
// Σ a_i b_i over the 4 signed bytes of a and of b.
int sdot(uint a, uint b) {
    return sdot_packed(a, b, 0);
}
// Σ u_i s_i over the 4 unsigned bytes of u and the 4 signed bytes of s.
int udot(uint u, uint s) {
    return sudot_packed(s, u, 0);
}
#else
ivec4 sbytes(uint v) {
    return ivec4(uvec4(v) << uvec4(24u, 16u, 8u, 0u)) >> 24;
}
int sdot(uint a, uint b) {
    ivec4 x = sbytes(a) * sbytes(b);
    return x.x + x.y + x.z + x.w;
}
int udot(uint u, uint s) {
    ivec4 x = ivec4((uvec4(u) >> uvec4(0u, 8u, 16u, 24u)) & 255u) * sbytes(s);
    return x.x + x.y + x.z + x.w;
}
#endif

const uint ONES = 0x01010101u;
const uint LO4 = 0x0f0f0f0fu;

// Per block slot: set by the kernel's load_x, used by its dot of every row.
uvec4 XA;
uvec4 XB;
vec4 FX;
ivec4 IX;
