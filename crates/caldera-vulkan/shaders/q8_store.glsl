// Quantizes `n` consecutive values (n a multiple of 32) from `base` of the including
// shader's Q8_SRC(i) into int8 blocks of 32 in quant_x.comp's format (words xq[base / 4
// ..], scales xd[base / 32 ..]) for the next int8-activation mat-vec. One invocation per
// block; the caller makes the values visible to the whole workgroup first.
void q8_store(uint base, uint n) {
    for (uint bk = gl_LocalInvocationID.x; bk < n / 32u; bk += WG) {
        uint b0 = base + 32u * bk;
        float amax = 0.0;
        for (uint i = 0u; i < 32u; i++) {
            amax = max(amax, abs(Q8_SRC(b0 + i)));
        }
        float id = amax > 0.0 ? 127.0 / amax : 0.0;
        for (uint wi = 0u; wi < 8u; wi++) {
            uint word = 0u;
            for (uint e = 0u; e < 4u; e++) {
                int q = clamp(int(roundEven(Q8_SRC(b0 + 4u * wi + e) * id)), -127, 127);
                word |= (uint(q) & 255u) << (8u * e);
            }
            xq[(b0 >> 2) + wi] = word;
        }
        xd[b0 >> 5] = amax / 127.0;
    }
}
