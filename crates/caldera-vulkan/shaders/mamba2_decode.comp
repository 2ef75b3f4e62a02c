#version 450
// Mamba2 decode step (one token at position pos = step[1]) for every head: conv + SiLU
// over xBC, dt = max(softplus(dt + dt_bias), dt_min), S = exp(dt A) S + dt x ⊗ B,
// y = S C + D x, then y * silu(z) RMS-normed within each group of d_inner / G channels.
// caldera-cpu/src/mamba2.rs defines it.
//
// Workgroup (h, t): head h, head channels t * tile .. (t + 1) * tile (tile <= WG). It
// convolves its group's B and C (every workgroup of the group does, from the ring) and
// its own x channels; invocation i owns channel i % tile and the state rows
// n = i / tile (mod WG / tile) of it. When a norm group spans several workgroups (several
// heads per group or several tiles), each writes its gated outputs and their sum of
// squares; the last of the group to finish (an atomic count, reset by it) norms them.
//
// Binding 0: proj (f32: z [d_inner] | xBC [conv_dim] | dt [H], in_proj's rows),
// 1: constants (f32: conv taps [conv_dim][K] | conv bias [conv_dim] | dt_bias [H] |
// A [H] | D [H] | norm [d_inner]), 2: conv ring ([K][conv_dim], conv_ring.glsl),
// 3: S ([H][N][P]: per head, N rows of the P channels), 4: out (f32, d_inner),
// 5: step values ([1] position), 6: partial sums of squares ([H][n_tiles]),
// 7: counts (u32 per group, zero between dispatches), 8, 9: with F_Q8, out as int8
// blocks of 32 (q8_store.glsl; d_inner / G a multiple of 32) for ssm_out.
//
// With F_BATCH, a batched decode step: workgroups come in runs of n_h * n_tiles per
// column; column c < step[0] is the sequence in pool slot step[8 + 2c] at position
// step[9 + 2c], its proj row c (ld_proj apart), its out row c (d_inner apart; the int8
// blocks as quant_rows lays them out), its ring and S the slot's (ring_stride and
// ssm_stride values per slot), its partials and counts its own. Columns past step[0]
// (a bucket's padding) exit at once, so they touch no state.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer Ring { float ring[]; };
layout(std430, binding = 3) buffer Ssm { float ssm[]; };
layout(std430, binding = 4) coherent buffer Out { float y[]; };
layout(std430, binding = 5) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 6) coherent buffer Part { float part[]; };
layout(std430, binding = 7) coherent buffer Cnt { uint cnt[]; };
layout(std430, binding = 8) writeonly buffer Q8 { uint xq[]; };
layout(std430, binding = 9) writeonly buffer D8 { float xd[]; };

#include "act.glsl"
#include "recurrent.glsl"
// The column's offsets: proj row, ring and S of its slot, out row, partials, counts.
uint PB;
uint RB;
uint SB;
uint OB;
uint TB;
uint CB;
#define RING_BASE RB
#include "conv_ring.glsl"
#define Q8_SRC(i) y[i]
#include "q8_store.glsl"

const uint MAX_N = 512u;
const uint F_Q8 = 1u; // also write out as int8 blocks
const uint F_BATCH = 2u; // a batched decode step's columns

layout(push_constant) uniform Push {
    uint n_h;
    uint hp;   // head size P
    uint ns;   // state size N
    uint n_g;
    uint kern;
    uint tile;
    uint n_tiles;
    uint flags;
    float eps;
    float dt_min;
    uint ld_proj;     // F_BATCH: values between proj rows
    uint ring_stride; // F_BATCH: ring values per pool slot
    uint ssm_stride;  // F_BATCH: S values per pool slot
} p;

shared float b_s[MAX_N];
shared float c_s[MAX_N];
shared float x_s[WG];
shared float part_s[WG];
shared bool last_s;

void main() {
    uint grp = flat_group();
    uint pos;
    if ((p.flags & F_BATCH) != 0u) {
        uint per = p.n_h * p.n_tiles;
        uint col = grp / per;
        if (col >= step[0]) {
            return; // uniform for the workgroup
        }
        grp -= col * per;
        uint slot = step[8u + 2u * col];
        pos = step[9u + 2u * col];
        PB = col * p.ld_proj;
        RB = slot * p.ring_stride;
        SB = slot * p.ssm_stride;
        OB = col * p.n_h * p.hp;
        TB = col * per;
        CB = col * p.n_g;
    } else {
        pos = step[1];
        PB = 0u;
        RB = 0u;
        SB = 0u;
        OB = 0u;
        TB = 0u;
        CB = 0u;
    }
    uint h = grp / p.n_tiles;
    if (h >= p.n_h) {
        return; // uniform for the workgroup
    }
    uint ti = grp % p.n_tiles;
    uint tid = gl_LocalInvocationID.x;
    uint hpg = p.n_h / p.n_g;
    uint g = h / hpg;
    uint di = p.n_h * p.hp;
    uint gn = p.n_g * p.ns;
    uint cd = di + 2u * gn;
    uint c0 = ti * p.tile;
    uint tcols = min(p.tile, p.hp - c0);
    // The group's first head (tile 0) writes B and C into the ring.
    bool own_bc = ti == 0u && h % hpg == 0u;

    for (uint i = tid; i < 2u * p.ns; i += WG) {
        bool is_b = i < p.ns;
        uint ch = di + (is_b ? g * p.ns + i : gn + g * p.ns + (i - p.ns));
        float v = silu(ring_conv(ch, proj[PB + di + ch], pos, cd, p.kern, own_bc));
        if (is_b) {
            b_s[i] = v;
        } else {
            c_s[i - p.ns] = v;
        }
    }
    for (uint c = tid; c < tcols; c += WG) {
        uint ch = h * p.hp + c0 + c;
        x_s[c] = silu(ring_conv(ch, proj[PB + di + ch], pos, cd, p.kern, true));
    }
    uint pb = cd * (p.kern + 1u);
    float dt = max(softplus(proj[PB + di + cd + h] + par[pb + h]), p.dt_min);
    float decay = exp(dt * par[pb + p.n_h + h]);
    float dskip = par[pb + 2u * p.n_h + h];
    barrier();

    uint rs = WG / p.tile;
    uint c = tid % p.tile;
    uint sl = tid / p.tile;
    bool act = sl < rs && c < tcols;
    bool lead = sl == 0u && c < tcols;
    uint sbase = SB + h * p.ns * p.hp + c0 + c;
    float acc = 0.0;
    if (act) {
        float dx = dt * x_s[c];
        for (uint n = sl; n < p.ns; n += rs) {
            uint at = sbase + n * p.hp;
            float s = ssm[at] * decay + dx * b_s[n];
            ssm[at] = s;
            acc += s * c_s[n];
        }
    }
    part_s[tid] = acc;
    barrier();
    float yv = 0.0;
    uint ch = h * p.hp + c0 + c;
    if (lead) {
        for (uint s = 0u; s < rs; s++) {
            yv += part_s[s * p.tile + c];
        }
        yv = (yv + dskip * x_s[c]) * silu(proj[PB + ch]);
    }
    float ss = reduce_sum(yv * yv);

    uint nb = pb + 3u * p.n_h;
    uint gs = hpg * p.hp;
    uint per_group = hpg * p.n_tiles;
    if (per_group == 1u) {
        float inv = inversesqrt(ss / float(gs) + p.eps);
        if (lead) {
            y[OB + ch] = yv * inv * par[nb + ch];
        }
        if ((p.flags & F_Q8) != 0u) {
            memoryBarrierBuffer();
            barrier();
            q8_store(OB + g * gs, gs);
        }
        return;
    }
    if (lead) {
        y[OB + ch] = yv;
    }
    if (tid == 0u) {
        part[TB + h * p.n_tiles + ti] = ss;
    }
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(cnt[CB + g], 1u);
        last_s = done == per_group - 1u;
        if (last_s) {
            cnt[CB + g] = 0u;
        }
    }
    barrier();
    if (!last_s) {
        return; // uniform for the workgroup
    }
    memoryBarrierBuffer();
    float tot = 0.0;
    for (uint t = 0u; t < per_group; t++) {
        tot += part[TB + g * per_group + t];
    }
    float inv = inversesqrt(tot / float(gs) + p.eps);
    for (uint i = tid; i < gs; i += WG) {
        uint at = g * gs + i;
        y[OB + at] = y[OB + at] * inv * par[nb + at];
    }
    if ((p.flags & F_Q8) != 0u) {
        memoryBarrierBuffer();
        barrier();
        q8_store(OB + g * gs, gs);
    }
}
