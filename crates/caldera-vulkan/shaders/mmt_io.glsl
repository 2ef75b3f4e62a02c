// What the tiled prefill matmuls share (mmt.glsl: f32 FMA tiles; mmc.glsl: cooperative
// matrices): the tile shape, flags, bindings, push constants and the raw loads of one
// 32-element step (fetch_step). See mmt.glsl for the semantics.
#extension GL_EXT_control_flow_attributes : enable

const uint MMT_WG = 256u;
const uint BM = 128u; // weight rows per workgroup
const uint BN = 64u;  // tokens per workgroup
const uint BK = 32u;  // elements per step: one 32-element group of every block type
layout(local_size_x = 256, local_size_y = 1, local_size_z = 1) in;

const uint MM_NORM = 1u;
const uint MM_ADD = 2u;
const uint MM_GLU_SILU = 4u;
const uint MM_GLU_GELU = 8u;
const uint MM_SOFTCAP = 16u;
const uint MM_TOKSEL = 32u;

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
// The same weights as 16-byte words (block types whose fields are 16-byte aligned).
layout(std430, binding = 0) readonly buffer Wbuf4 { uvec4 w4[]; };
layout(std430, binding = 1) readonly buffer Xbuf { float x[]; };
// The same inputs and norm weights as vec4s (when ld_x and k are multiples of 8).
layout(std430, binding = 1) readonly buffer Xbuf4 { vec4 x4[]; };
layout(std430, binding = 2) buffer Ybuf { float y[]; };
layout(std430, binding = 3) readonly buffer Gbuf { float gam[]; };
layout(std430, binding = 3) readonly buffer Gbuf4 { vec4 gam4[]; };
#ifdef MMT_EXPERT
// The grouped expert matmul (mmx_*): the columns of a tile are (token, slot) pairs of one
// expert, from moe_group.comp's group buffer (binding 4); pair q reads its input at
// x[(q / x_div) * ld_x] and writes its outputs at y[q * ld_y ..]. The weight piece holds
// experts e0 .. e0 + ne of `rows` rows each; tiles of experts in other pieces exit.
// Workgroup f (flat) serves row tile f % rtiles of tile slot f / rtiles; slots past the
// step's tile count exit, so the dispatch is sized for the worst case at record time.
// Outputs (MMX_GLU): rows 2i, 2i + 1 are expert output i's (gate, up): y[i] =
// act(gate + b, up + b) (SiLU, GELU-tanh or gpt-oss's clamped SwiGLU); else y[r] = row
// + b, relu(row + b)^2 with MMX_RELU2, times the pair's routing weight with MMX_WEIGHT.
// Bindings 4: group buffer (u32). 5: routing weights (f32). 6: bias (f32 [n][rows]).
layout(std430, binding = 4) readonly buffer Xgbuf { uint mxg[]; };
layout(std430, binding = 5) readonly buffer Wtbuf { float wts[]; };
layout(std430, binding = 6) readonly buffer Bbuf { float ebias[]; };

const uint MMX_NOGAM = 64u;
const uint MMX_GLU = 128u;
const uint MMX_GELU = 256u;
const uint MMX_CLAMP = 512u;
const uint MMX_RELU2 = 1024u;
const uint MMX_BIAS = 2048u;
const uint MMX_WEIGHT = 4096u;

layout(push_constant) uniform Push {
    uint k;        // elements per weight row
    uint rows;     // rows per expert
    uint e0;       // first expert of this piece
    uint ld_x;     // elements between inputs in x
    uint ld_y;     // elements between pairs in y
    uint flags;    // MM_NORM, MMX_* bits
    float eps;     // MM_NORM epsilon
    float alpha;   // MMX_CLAMP
    float limit;   // MMX_CLAMP
    uint ne;       // experts in this piece
    uint x_div;    // pairs per input row (k slots: the pairs of a token share its row)
    uint n_used;   // routed slots per token
    uint pt;       // routing entries per token
    uint rtiles;   // row tiles per expert (ceil(rows / BM))
    uint max_tiles;
    uint pairs_at; // the pair list's first word in the group buffer
    uint slot0;    // the routing entry of a token's first slot (pair q: slot q % n_used)
} p;
#else
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per weight row
    uint rows;     // rows in this piece
    uint y_offset; // element of a token's y row that the piece's row 0 writes
    uint ld_x;     // elements between tokens in x
    uint ld_y;     // elements between tokens in y
    uint flags;    // MM_* bits
    float eps;     // MM_NORM epsilon
    float cap;     // MM_SOFTCAP: y = cap * tanh(y / cap)
    uint ttiles;   // token tiles dispatched per row tile (ceil(max tokens / BN))
} p;
#endif

#include "words.glsl"
#include "act.glsl"
#include "deq_tile.glsl"

// Matmul input e (0..8) of an invocation's fetched xr: act(gate) * up of pair e with
// `glu`, else x * gam, adding x^2 to `ss` (MM_NORM's sums of squares of the raw inputs).
float input_value(float xr[16], uint e, bool glu, bool gelu, inout float ss) {
    if (glu) {
        return (gelu ? gelu_tanh(xr[2u * e]) : silu(xr[2u * e])) * xr[2u * e + 1u];
    }
    ss += xr[e] * xr[e];
    return xr[e] * xr[8u + e];
}

// The raw inputs of step sb for one invocation: the words of weight row `row`, half
// group ah (wr), and the 8 inputs of the token whose x row starts at xb from element
// c0 = 32 sb + 8 bq (xr: 8 x and 8 gam values, or 8 (gate, up) pairs); zeros past the
// last row, token or element, which decode and multiply to zeros.
// With `vec_x` (ld_x and k multiples of 8) the inputs are read as vec4s.
void fetch_step(uint row, uint sb, uint ah, bool arow_ok, uint xb, uint c0, bool btok_ok,
                bool glu, bool vec_x, out uint wr[16], out float xr[16]) {
    [[unroll]] for (uint e = 0u; e < 16u; e++) {
        wr[e] = 0u;
        xr[e] = 0.0;
    }
    if (arow_ok) {
        fetch16(row, sb, ah, wr);
    }
    if (vec_x) {
        if (btok_ok && c0 < p.k) {
            [[unroll]] for (uint i = 0u; i < 4u; i++) {
                vec4 v;
                if (glu) {
                    v = x4[(xb + 2u * c0) / 4u + i];
                } else {
#ifdef MMT_EXPERT
                    v = i < 2u ? x4[(xb + c0) / 4u + i]
                               : ((p.flags & MMX_NOGAM) != 0u ? vec4(1.0) : gam4[c0 / 4u + i - 2u]);
#else
                    v = i < 2u ? x4[(xb + c0) / 4u + i] : gam4[c0 / 4u + i - 2u];
#endif
                }
                xr[4u * i] = v.x;
                xr[4u * i + 1u] = v.y;
                xr[4u * i + 2u] = v.z;
                xr[4u * i + 3u] = v.w;
            }
        }
    } else if (btok_ok) {
        [[unroll]] for (uint e = 0u; e < 8u; e++) {
            uint c = c0 + e;
            if (c < p.k) {
                if (glu) {
                    xr[2u * e] = x[xb + 2u * c];
                    xr[2u * e + 1u] = x[xb + 2u * c + 1u];
                } else {
                    xr[e] = x[xb + c];
#ifdef MMT_EXPERT
                    xr[8u + e] = (p.flags & MMX_NOGAM) != 0u ? 1.0 : gam[c];
#else
                    xr[8u + e] = gam[c];
#endif
                }
            }
        }
    }
}

