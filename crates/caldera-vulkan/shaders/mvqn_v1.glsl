// The block readers of mvqn.glsl as they were before the weights were unpacked once per
// block (issue 6), for the A/B kernels mvqmo_* / mvqmoe_* (CALDERA_VK_MVQM_V1=1):
// wdot redoes the nibble masks per column and the epilogue adds its sum to the
// accumulator last. Included by mvqn.glsl with MVQN_V1.
#if defined(TYPE_Q4_0)
// 18 B / 32: d, qs[16]. Lane t (of 2): qs[8t .. 8t + 8], elements 8t .. + 8 (low
// nibbles) and 16 + 8t .. + 8 (high); value d (n - 8).
const uint L = 2u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    uvec2 lo = xq2[XO2 + (4u * b + lane)];
    uvec2 hi = xq2[XO2 + (4u * b + 2u + lane)];
    XA = uvec4(lo, hi);
    FX.x = xd[XOD + (b)];
    IX.x = sdot(lo.x, ONES) + sdot(lo.y, ONES) + sdot(hi.x, ONES) + sdot(hi.y, ONES);
}
struct WB {
    uvec2 q;
    float d;
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 18u;
    return WB(u64_at(o + 2u + 8u * lane), f16_at(o));
}
float wdot(WB w) {
    int s = udot(w.q.x & LO4, XA.x) + udot(w.q.y & LO4, XA.y)
          + udot((w.q.x >> 4) & LO4, XA.z) + udot((w.q.y >> 4) & LO4, XA.w);
    return w.d * FX.x * float(s - 8 * IX.x);
}
#elif defined(TYPE_Q8_0)
// 34 B / 32: d, qs: i8[32]. Lane t (of 4): qs[8t .. 8t + 8].
const uint L = 4u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    XA.xy = xq2[XO2 + (4u * b + lane)];
    FX.x = xd[XOD + (b)];
}
struct WB {
    uvec2 q;
    float d;
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 34u;
    return WB(u64_at(o + 2u + 8u * lane), f16_at(o));
}
float wdot(WB w) {
    return w.d * FX.x * float(sdot(w.q.x, XA.x) + sdot(w.q.y, XA.y));
}
#elif defined(TYPE_Q4_K)
// 144 B / 256: d, dmin, scales[12], qs[128]. Lane t (of 8), j = t / 2, h = t % 2:
// qs[32j + 16h .. + 16], elements 64j + 16h .. + 16 (low nibbles, group 2j) and
// 64j + 32 + 16h .. + 16 (high nibbles, group 2j + 1); value d sc n - dmin mn.
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint j = lane >> 1;
    uint e = 256u * b + 64u * j + 16u * (lane & 1u);
    XA = xq4[XO4 + (e >> 4)];
    XB = xq4[XO4 + ((e + 32u) >> 4)];
    float dl = xd[XOD + (8u * b + 2u * j)];
    float dh = xd[XOD + (8u * b + 2u * j + 1u)];
    int sl = sdot(XA.x, ONES) + sdot(XA.y, ONES) + sdot(XA.z, ONES) + sdot(XA.w, ONES);
    int sh = sdot(XB.x, ONES) + sdot(XB.y, ONES) + sdot(XB.z, ONES) + sdot(XB.w, ONES);
    FX = vec4(dl, dh, dl * float(sl), dh * float(sh));
}
struct WB {
    uvec4 q;
    vec4 s; // d sc (low, high groups), dmin mn (low, high)
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 256u) + b) * 9u; // 16-byte units
    uint j = lane >> 1;
    uvec4 hd = w4[o];
    uvec4 q = w4[o + 1u + 2u * j + (lane & 1u)];
    vec2 dm = unpackHalf2x16(hd.x);
    uint sh = 16u * (j & 1u);
    uint sa = hd.y >> sh;
    uint sb = hd.z >> sh;
    uint sc = hd.w >> sh;
    uint scl = j < 2u ? sa & 0x3f3fu : (sc & 0x0f0fu) | ((sa >> 2) & 0x3030u);
    uint mnl = j < 2u ? sb & 0x3f3fu : ((sc >> 4) & 0x0f0fu) | ((sb >> 2) & 0x3030u);
    return WB(q, vec4(dm.x * float(scl & 255u), dm.x * float(scl >> 8),
                      dm.y * float(mnl & 255u), dm.y * float(mnl >> 8)));
}
float wdot(WB w) {
    int lo = udot(w.q.x & LO4, XA.x) + udot(w.q.y & LO4, XA.y)
           + udot(w.q.z & LO4, XA.z) + udot(w.q.w & LO4, XA.w);
    int hi = udot((w.q.x >> 4) & LO4, XB.x) + udot((w.q.y >> 4) & LO4, XB.y)
           + udot((w.q.z >> 4) & LO4, XB.z) + udot((w.q.w >> 4) & LO4, XB.w);
    return w.s.x * FX.x * float(lo) + w.s.y * FX.y * float(hi)
         - (w.s.z * FX.z + w.s.w * FX.w);
}
#elif defined(TYPE_Q6_K)
// 210 B / 256: ql[128], qh[64], scales: i8[16], d. Lane t (of 8), n = t / 4,
// l0 = 8 (t % 4): l = l0 .. l0 + 8 of half n, elements 128n + 32m + l (m = 0..3) from
// the nibbles of ql[64n + l] (m = 0, 2) and ql[64n + 32 + l] (m = 1, 3) and bits 2m of
// qh[32n + l]; value d sc[8n + l0 / 16 + 2m] (q - 32).
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint n = lane >> 2;
    uint e = 256u * b + 128u * n + 8u * (lane & 3u);
    uvec2 x0 = xq2[XO2 + (e >> 3)];
    uvec2 x1 = xq2[XO2 + ((e + 32u) >> 3)];
    uvec2 x2 = xq2[XO2 + ((e + 64u) >> 3)];
    uvec2 x3 = xq2[XO2 + ((e + 96u) >> 3)];
    XA = uvec4(x0, x1);
    XB = uvec4(x2, x3);
    uint db = 8u * b + 4u * n;
    FX = vec4(xd[XOD + (db)], xd[XOD + (db + 1u)], xd[XOD + (db + 2u)], xd[XOD + (db + 3u)]);
    IX = 32 * ivec4(sdot(x0.x, ONES) + sdot(x0.y, ONES), sdot(x1.x, ONES) + sdot(x1.y, ONES),
                    sdot(x2.x, ONES) + sdot(x2.y, ONES), sdot(x3.x, ONES) + sdot(x3.y, ONES));
}
struct WB {
    uvec4 q[2]; // the 6-bit values of the lane's four groups, as bytes (0 .. 63)
    vec4 sc;    // d sc of the four groups
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 256u) + b) * 210u;
    uint n = lane >> 2;
    uint l0 = 8u * (lane & 3u);
    uvec2 a = u64_at(o + 64u * n + l0);
    uvec2 c = u64_at(o + 64u * n + 32u + l0);
    uvec2 h = u64_at(o + 128u + 32u * n + l0);
    uvec2 s = u64_at(o + 192u + 8u * n);
    int is = int(8u * (l0 >> 4));
    float d = f16_at(o + 208u);
    vec4 sc = d * vec4(bitfieldExtract(int(s.x), is, 8), bitfieldExtract(int(s.x), is + 16, 8),
                       bitfieldExtract(int(s.y), is, 8), bitfieldExtract(int(s.y), is + 16, 8));
    const uint M2 = 0x30303030u;
    WB w;
    w.q[0] = uvec4((a.x & LO4) | ((h.x << 4) & M2), (a.y & LO4) | ((h.y << 4) & M2),
                   (c.x & LO4) | ((h.x << 2) & M2), (c.y & LO4) | ((h.y << 2) & M2));
    w.q[1] = uvec4(((a.x >> 4) & LO4) | (h.x & M2), ((a.y >> 4) & LO4) | (h.y & M2),
                   ((c.x >> 4) & LO4) | ((h.x >> 2) & M2), ((c.y >> 4) & LO4) | ((h.y >> 2) & M2));
    w.sc = sc;
    return w;
}
float wdot(WB w) {
    int d0 = udot(w.q[0].x, XA.x) + udot(w.q[0].y, XA.y);
    int d1 = udot(w.q[0].z, XA.z) + udot(w.q[0].w, XA.w);
    int d2 = udot(w.q[1].x, XB.x) + udot(w.q[1].y, XB.y);
    int d3 = udot(w.q[1].z, XB.z) + udot(w.q[1].w, XB.w);
    vec4 v = vec4(ivec4(d0, d1, d2, d3) - IX) * FX;
    return dot(w.sc, v);
}
#else
#error "no TYPE_* defined"
#endif

float wacc(float acc, WB w) {
    return acc + wdot(w);
}
