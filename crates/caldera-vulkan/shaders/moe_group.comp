#version 450
#extension GL_EXT_control_flow_attributes : enable
// Groups the (token, slot) pairs of a step's routing by expert, for the grouped expert
// matmuls (mmx_*, mmt.glsl with MMT_EXPERT). One workgroup of 256.
// Pair q = t * k + s is slot s (< k: the routed slots, or the shared expert's with
// slot0 = its entry) of token t (< step[0]); its expert is ids[t * pt + slot0 + s]. Writes into the group buffer g (u32 words):
//   g[0]                      the number of tiles;
//   g[1 + 2 i], g[2 + 2 i]    tile i (i < max_tiles): the index of its first pair in
//                             the pair list, and expert | pairs in the tile << 16; an
//                             expert of c pairs has ceil(c / 64) tiles of up to 64
//                             pairs, experts in ascending order;
//   g[pairs_at + j]           the pair list (step[0] * k pairs): grouped by expert in
//                             ascending order, within an expert by token (ascending q),
//                             so the result does not depend on scheduling;
//   g[offs_at + e]            the first pair of expert e in the list (e <= n: the last
//                             is the number of pairs).
// Counting uses integer atomics on shared memory (order-free). The placement runs over
// windows of W tokens: a bit per (expert, token of the window) set with atomicOr (each
// token's experts are distinct, so each bit once), then every pair lands at its
// expert's cursor + the number of its expert's bits before its token's: the same
// place whatever the scheduling, with no serial scan.
// Binding 0: ids (u32). 1: step values (u32; step[0] tokens). 2: group buffer (u32).

layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;
const uint GWG = 256u;
const uint MAXE = 1024u;
const uint TILE = 64u; // pairs per tile: mmt.glsl's BN
const uint MW = 2048u; // mask words: n * (W / 32) per window

layout(std430, binding = 0) readonly buffer Ibuf { uint ids[]; };
layout(std430, binding = 1) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 2) buffer Gbuf { uint g[]; };

layout(push_constant) uniform Push {
    uint n;         // experts
    uint k;         // routed slots per token
    uint pt;        // routing entries per token
    uint max_tokens; // tokens the routing holds (step[0] is clamped to it)
    uint max_tiles;
    uint pairs_at;
    uint offs_at;
    uint slot0;     // the first routing entry of a token that the slots start at
} p;

shared uint cnt[MAXE];
shared uint cur[MAXE];
shared uint masks[MW];

uint entry_expert(uint q) {
    return ids[(q / p.k) * p.pt + p.slot0 + q % p.k];
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint nt = min(step[0], p.max_tokens);
    uint total = nt * p.k;
    for (uint e = tid; e < p.n; e += GWG) {
        cnt[e] = 0u;
    }
    barrier();
    for (uint q = tid; q < total; q += GWG) {
        uint e = entry_expert(q);
        if (e < p.n) {
            atomicAdd(cnt[e], 1u);
        }
    }
    barrier();
    if (tid == 0u) {
        uint o = 0u;
        uint tiles = 0u;
        for (uint e = 0u; e < p.n; e++) {
            uint c = cnt[e];
            cur[e] = o;
            g[p.offs_at + e] = o;
            for (uint j = 0u; j < c; j += TILE) {
                if (tiles < p.max_tiles) {
                    g[1u + 2u * tiles] = o + j;
                    g[2u + 2u * tiles] = e | (min(TILE, c - j) << 16);
                }
                tiles++;
            }
            o += c;
        }
        g[p.offs_at + p.n] = o;
        g[0] = min(tiles, p.max_tiles);
    }
    barrier();
    // Mask words per expert per window (>= 2 for n <= 1024) and tokens per window.
    uint wpe = min(MW / p.n, 32u);
    uint win = 32u * wpe;
    for (uint t0 = 0u; t0 < nt; t0 += win) {
        uint wt = min(win, nt - t0);
        for (uint i = tid; i < p.n * wpe; i += GWG) {
            masks[i] = 0u;
        }
        barrier();
        for (uint i = tid; i < wt * p.k; i += GWG) {
            uint q = t0 * p.k + i;
            uint e = entry_expert(q);
            uint tl = i / p.k;
            if (e < p.n) {
                atomicOr(masks[e * wpe + tl / 32u], 1u << (tl % 32u));
            }
        }
        barrier();
        for (uint i = tid; i < wt * p.k; i += GWG) {
            uint q = t0 * p.k + i;
            uint e = entry_expert(q);
            uint tl = i / p.k;
            if (e < p.n) {
                uint pos = cur[e];
                uint c = tl / 32u;
                for (uint j = 0u; j < c; j++) {
                    pos += bitCount(masks[e * wpe + j]);
                }
                pos += bitCount(masks[e * wpe + c] & ((1u << (tl % 32u)) - 1u));
                g[p.pairs_at + pos] = q;
            }
        }
        barrier();
        for (uint e = tid; e < p.n; e += GWG) {
            uint c = 0u;
            for (uint j = 0u; j < wpe; j++) {
                c += bitCount(masks[e * wpe + j]);
            }
            cur[e] += c;
        }
        barrier();
    }
}
