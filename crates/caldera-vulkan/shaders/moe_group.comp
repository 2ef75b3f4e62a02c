#version 450
#extension GL_EXT_control_flow_attributes : enable
// Groups the (token, slot) pairs of a step's routing by expert, for the grouped expert
// matmuls (mmx_*, mmt.glsl with MMT_EXPERT). One workgroup of 256.
// Pair q = t * k + s is slot s (< k, the routed slots) of token t (< step[0]); its
// expert is ids[t * pt + s]. Writes into the group buffer g (u32 words):
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
// Counting uses integer atomics on shared memory (order-free); the placement is done by
// the invocation that owns the expert (e % 256), scanning the ids in order.
// Binding 0: ids (u32). 1: step values (u32; step[0] tokens). 2: group buffer (u32).

layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;
const uint GWG = 256u;
const uint MAXE = 1024u;
const uint TILE = 64u; // pairs per tile: mmt.glsl's BN
const uint CH = 2048u; // ids staged in shared memory per pass

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
} p;

shared uint cnt[MAXE];
shared uint cur[MAXE];
shared uint chunk[CH];

uint entry_expert(uint q) {
    return ids[(q / p.k) * p.pt + q % p.k];
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
    for (uint c0 = 0u; c0 < total; c0 += CH) {
        uint m = min(CH, total - c0);
        for (uint i = tid; i < m; i += GWG) {
            chunk[i] = entry_expert(c0 + i);
        }
        barrier();
        for (uint i = 0u; i < m; i++) {
            uint e = chunk[i];
            if (e < p.n && e % GWG == tid) {
                g[p.pairs_at + cur[e]] = c0 + i;
                cur[e] += 1u;
            }
        }
        barrier();
    }
}
