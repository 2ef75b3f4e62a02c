// Mat-vec y[y_offset + r] = dot(W row r, x[x_offset ..]) for the rows of one weight piece.
// Binding 0: the piece's raw GGML blocks, rows back to back (row r at byte r * row_bytes),
//            read as 32-bit words (no 8/16-bit storage needed).
// Binding 1: x, f32. Binding 2: y, f32.
// Specialization constant 1: ROWS, rows per workgroup; one reduction per row.
#include "common.glsl"

layout(constant_id = 1) const uint ROWS = 1;

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 1) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 2) writeonly buffer Ybuf { float y[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per row
    uint rows;     // rows in this piece
    uint x_offset; // first element of x
    uint y_offset; // element of y that row 0 of the piece writes
} p;

// Little-endian readers at byte offsets into w.
uint byte_at(uint o) {
    return (w[o >> 2] >> ((o & 3u) * 8u)) & 0xffu;
}
// `o` even.
uint u16_at(uint o) {
    return (w[o >> 2] >> ((o & 2u) * 8u)) & 0xffffu;
}
// `o` even.
uint u32_at(uint o) {
    uint i = o >> 2;
    if ((o & 2u) == 0u) {
        return w[i];
    }
    return (w[i] >> 16) | (w[i + 1u] << 16);
}
// `o` even.
float f16_at(uint o) {
    return unpackHalf2x16(u16_at(o)).x;
}
