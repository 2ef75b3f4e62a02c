// Little-endian readers of the weight words `w` (declared by the including shader) at
// byte offsets; offsets past 2-byte alignment read the word after too (weight pieces
// carry a tail for that, PIECE_PAD).
uint byte_at(uint o) {
    return (w[o >> 2] >> ((o & 3u) * 8u)) & 0xffu;
}
// `o` even.
uint u16_at(uint o) {
    return (w[o >> 2] >> ((o & 2u) * 8u)) & 0xffffu;
}
// The 4 bytes at even offset `o`, without a branch (lanes of one subgroup read blocks
// of both alignments): a funnel shift of two words (shift 0 or 16).
uint u32_at(uint o) {
    uint i = o >> 2;
    uint sh = (o & 2u) * 8u;
    return (w[i] >> sh) | ((w[i + 1u] << 1u) << (31u - sh));
}
// The 8 bytes at even offset `o`.
uvec2 u64_at(uint o) {
    uint i = o >> 2;
    uint sh = (o & 2u) * 8u;
    uint a = w[i];
    uint b = w[i + 1u];
    uint c = w[i + 2u];
    return uvec2((a >> sh) | ((b << 1u) << (31u - sh)), (b >> sh) | ((c << 1u) << (31u - sh)));
}
// `o` even.
float f16_at(uint o) {
    return unpackHalf2x16(u16_at(o)).x;
}
