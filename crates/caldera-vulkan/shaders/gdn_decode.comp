#version 450
// GatedDeltaNet decode step (one token at position pos = step[1]) for every value head:
// conv + SiLU over q|k|v, L2-normed q (times 1/sqrt(dk)) and k, beta = sigmoid(b),
// g = A * softplus(a + dt_bias), the delta rule on the state S [dk][dv] of the head,
// and the gated RMSNorm rmsnorm(o) * norm * silu(z). caldera-cpu/src/gdn.rs defines it.
//
// Workgroup (j, t): value head j, value columns t * tile .. (t + 1) * tile (tile <= WG).
// It convolves its key head's q and k (every workgroup of that key head does, from the
// ring) and its own v columns; invocation i owns column i % tile and the rows
// a = i / tile (mod WG / tile) of it. With several tiles per head, each writes its raw
// outputs and their sum of squares; the last tile of the head to finish (an atomic
// count, reset by it) norms the head's whole output.
//
// Binding 0: proj (f32: qkv [conv_dim] | z [n_v * dv] | b [n_v] | a [n_v], or the fused
// ssm_ba order for the last 2 n_v with F_FUSED_BA), 1: constants (f32: conv taps
// [conv_dim][K] | conv bias [conv_dim] | dt_bias [n_v] | A [n_v] | norm [dv]),
// 2: conv ring ([K][conv_dim], conv_ring.glsl), 3: S ([n_v][dk][dv]), 4: out
// (f32, n_v * dv), 5: step values ([1] position), 6: partial sums of squares
// ([n_v][n_tiles]), 7: counts (u32 per value head, zero between dispatches), 8, 9: with
// F_Q8, out as int8 blocks of 32 (q8_store.glsl; dv a multiple of 32) for ssm_out.
//
// With F_BATCH, a batched decode step: workgroups come in runs of n_v * n_tiles per
// column; column c < step[0] is the sequence in pool slot step[8 + 2c] at position
// step[9 + 2c], its proj row c (ld_proj apart), its out row c (n_v * dv apart; the int8
// blocks as quant_rows lays them out), its ring and S the slot's (ring_stride and
// ssm_stride values per slot), its partials and counts its own. Columns past step[0]
// (a bucket's padding) exit at once, so they touch no state.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer Ring { float ring[]; };
layout(std430, binding = 3) buffer Ssm { float ssm[]; };
layout(std430, binding = 4) coherent buffer Out { float o[]; };
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
#define Q8_SRC(i) o[i]
#include "q8_store.glsl"

const uint F_TILED = 1u;    // value head j reads key head j % n_k (else j / (n_v / n_k))
const uint F_FUSED_BA = 2u; // b and a as ssm_ba writes them
const uint F_Q8 = 4u;       // also write out as int8 blocks
const uint F_BATCH = 8u;    // a batched decode step's columns
const uint MAX_DK = 512u;
const float L2_EPS = 1e-6;

layout(push_constant) uniform Push {
    uint n_k;
    uint n_v;
    uint dk;
    uint dv;
    uint kern;
    uint flags;
    uint tile;
    uint n_tiles;
    float eps;
    uint ld_proj;     // F_BATCH: values between proj rows
    uint ring_stride; // F_BATCH: ring values per pool slot
    uint ssm_stride;  // F_BATCH: S values per pool slot
} p;

shared float q_s[MAX_DK];
shared float k_s[MAX_DK];
shared float v_s[WG];
shared float d_s[WG];
shared float part_s[WG];
shared bool last_s;

void main() {
    uint grp = flat_group();
    uint pos;
    if ((p.flags & F_BATCH) != 0u) {
        uint per = p.n_v * p.n_tiles;
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
        OB = col * p.n_v * p.dv;
        TB = col * per;
        CB = col * p.n_v;
    } else {
        pos = step[1];
        PB = 0u;
        RB = 0u;
        SB = 0u;
        OB = 0u;
        TB = 0u;
        CB = 0u;
    }
    uint j = grp / p.n_tiles;
    if (j >= p.n_v) {
        return; // uniform for the workgroup
    }
    uint ti = grp % p.n_tiles;
    uint tid = gl_LocalInvocationID.x;
    uint nv = p.n_v;
    uint r = nv / p.n_k;
    bool tiled = (p.flags & F_TILED) != 0u;
    uint kh = tiled ? j % p.n_k : j / r;
    // The first value head of key head kh (tile 0) writes q and k into the ring.
    bool own_qk = ti == 0u && (tiled ? j < p.n_k : j % r == 0u);
    uint kd = p.n_k * p.dk;
    uint cd = 2u * kd + nv * p.dv;
    uint c0 = ti * p.tile;
    uint tcols = min(p.tile, p.dv - c0);

    for (uint i = tid; i < 2u * p.dk; i += WG) {
        bool is_q = i < p.dk;
        uint ch = is_q ? kh * p.dk + i : kd + kh * p.dk + (i - p.dk);
        float x = silu(ring_conv(ch, proj[PB + ch], pos, cd, p.kern, own_qk));
        if (is_q) {
            q_s[i] = x;
        } else {
            k_s[i - p.dk] = x;
        }
    }
    for (uint c = tid; c < tcols; c += WG) {
        uint ch = 2u * kd + j * p.dv + c0 + c;
        v_s[c] = silu(ring_conv(ch, proj[PB + ch], pos, cd, p.kern, true));
    }
    barrier();
    float sq = 0.0;
    float sk = 0.0;
    for (uint i = tid; i < p.dk; i += WG) {
        sq += q_s[i] * q_s[i];
        sk += k_s[i] * k_s[i];
    }
    sq = reduce_sum(sq);
    sk = reduce_sum(sk);
    float iq = inversesqrt(sq + L2_EPS) * inversesqrt(float(p.dk));
    float ik = inversesqrt(sk + L2_EPS);
    for (uint i = tid; i < p.dk; i += WG) {
        q_s[i] *= iq;
        k_s[i] *= ik;
    }

    // Gates.
    uint gb = PB + cd + nv * p.dv;
    float bv;
    float av;
    if ((p.flags & F_FUSED_BA) != 0u) {
        uint base = gb + (j / r) * 2u * r + j % r;
        bv = proj[base];
        av = proj[base + r];
    } else {
        bv = proj[gb + j];
        av = proj[gb + nv + j];
    }
    uint pb = cd * (p.kern + 1u);
    float beta = sigmoid(bv);
    float decay = exp(par[pb + nv + j] * softplus(av + par[pb + j]));
    barrier();

    // The delta rule on this tile's columns: delta = beta (v - (decay S)ᵀk),
    // S = decay S + k deltaᵀ, o = Sᵀq.
    uint rs = WG / p.tile;
    uint c = tid % p.tile;
    uint sl = tid / p.tile;
    bool act = sl < rs && c < tcols;
    bool lead = sl == 0u && c < tcols;
    uint sbase = SB + j * p.dk * p.dv + c0 + c;
    float acc = 0.0;
    if (act) {
        for (uint a = sl; a < p.dk; a += rs) {
            acc += ssm[sbase + a * p.dv] * k_s[a];
        }
    }
    part_s[tid] = acc;
    barrier();
    if (lead) {
        float t = 0.0;
        for (uint s = 0u; s < rs; s++) {
            t += part_s[s * p.tile + c];
        }
        d_s[c] = beta * (v_s[c] - decay * t);
    }
    barrier();
    acc = 0.0;
    if (act) {
        float dl = d_s[c];
        for (uint a = sl; a < p.dk; a += rs) {
            uint at = sbase + a * p.dv;
            float s = ssm[at] * decay + k_s[a] * dl;
            ssm[at] = s;
            acc += s * q_s[a];
        }
    }
    part_s[tid] = acc;
    barrier();
    float ov = 0.0;
    if (lead) {
        for (uint s = 0u; s < rs; s++) {
            ov += part_s[s * p.tile + c];
        }
    }
    float ss = reduce_sum(ov * ov);

    // Gated RMSNorm over the head's dv outputs.
    uint nb = pb + 2u * nv;
    uint ob = OB + j * p.dv;
    if (p.n_tiles == 1u) {
        float inv = inversesqrt(ss / float(p.dv) + p.eps);
        if (lead) {
            o[ob + c] = ov * inv * par[nb + c] * silu(proj[PB + cd + j * p.dv + c]);
        }
        if ((p.flags & F_Q8) != 0u) {
            memoryBarrierBuffer();
            barrier();
            q8_store(ob, p.dv);
        }
        return;
    }
    if (lead) {
        o[ob + c0 + c] = ov;
    }
    if (tid == 0u) {
        part[TB + j * p.n_tiles + ti] = ss;
    }
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(cnt[CB + j], 1u);
        last_s = done == p.n_tiles - 1u;
        if (last_s) {
            cnt[CB + j] = 0u;
        }
    }
    barrier();
    if (!last_s) {
        return; // uniform for the workgroup
    }
    memoryBarrierBuffer();
    float tot = 0.0;
    for (uint t = 0u; t < p.n_tiles; t++) {
        tot += part[TB + j * p.n_tiles + t];
    }
    float inv = inversesqrt(tot / float(p.dv) + p.eps);
    for (uint cc = tid; cc < p.dv; cc += WG) {
        uint at = ob + cc;
        o[at] = o[at] * inv * par[nb + cc] * silu(proj[PB + cd + j * p.dv + cc]);
    }
    if ((p.flags & F_Q8) != 0u) {
        memoryBarrierBuffer();
        barrier();
        q8_store(ob, p.dv);
    }
}
