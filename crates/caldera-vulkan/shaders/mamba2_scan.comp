#version 450
// Mamba2 prefill, part 2 of 3: the SSM over the m = step[0] tokens of a step, token
// after token (the recurrent form of mamba2_decode): dt = max(softplus(dt + dt_bias),
// dt_min), S = exp(dt A) S + dt x ⊗ B, y = (S C + D x) * silu(z), before the group norm.
// Workgroup (h, t): head h, head channels t * tile .. (t + 1) * tile (tile <= WG), which
// it alone updates for every token; invocation i owns channel i % tile and the state
// rows n = i / tile (mod WG / tile), as in mamba2_decode.
// Binding 0: proj rows (f32, [m][ld]: z | xBC | dt), 1: constants (mamba2_decode's),
// 2: xc (f32, [m][conv_dim], conv_rows' output), 3: S ([H][N][P]), 4: out (f32,
// [m][d_inner]), 5: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) readonly buffer Xc { float xc[]; };
layout(std430, binding = 3) buffer Ssm { float ssm[]; };
layout(std430, binding = 4) writeonly buffer Out { float y[]; };
layout(std430, binding = 5) readonly buffer Sbuf { uint step[]; };

#include "act.glsl"
#include "recurrent.glsl"

const uint MAX_N = 512u;

layout(push_constant) uniform Push {
    uint n_h;
    uint hp;
    uint ns;
    uint n_g;
    uint tile;
    uint n_tiles;
    uint ld;
    uint max_t; // rows the buffers hold (step[0] beyond it is clamped)
    uint pb;    // offset of dt_bias in the constants
    float dt_min;
} p;

shared float b_s[MAX_N];
shared float c_s[MAX_N];
shared float part_s[WG];

void main() {
    uint grp = flat_group();
    uint h = grp / p.n_tiles;
    if (h >= p.n_h) {
        return; // uniform for the workgroup
    }
    uint ti = grp % p.n_tiles;
    uint tid = gl_LocalInvocationID.x;
    uint g = h / (p.n_h / p.n_g);
    uint di = p.n_h * p.hp;
    uint gn = p.n_g * p.ns;
    uint cd = di + 2u * gn;
    uint c0 = ti * p.tile;
    uint tcols = min(p.tile, p.hp - c0);
    uint rs = WG / p.tile;
    uint c = tid % p.tile;
    uint sl = tid / p.tile;
    bool act = sl < rs && c < tcols;
    bool lead = sl == 0u && c < tcols;
    uint ch = h * p.hp + c0 + c;
    uint sbase = h * p.ns * p.hp + c0 + c;
    float a = par[p.pb + p.n_h + h];
    float dskip = par[p.pb + 2u * p.n_h + h];
    float dtb = par[p.pb + h];
    uint m = min(step[0], p.max_t);
    for (uint t = 0u; t < m; t++) {
        uint row = t * cd + di + g * p.ns;
        for (uint i = tid; i < p.ns; i += WG) {
            b_s[i] = xc[row + i];
            c_s[i] = xc[row + gn + i];
        }
        barrier();
        float dt = max(softplus(proj[t * p.ld + di + cd + h] + dtb), p.dt_min);
        float decay = exp(dt * a);
        float x = act ? xc[t * cd + ch] : 0.0;
        float acc = 0.0;
        if (act) {
            float dx = dt * x;
            for (uint n = sl; n < p.ns; n += rs) {
                uint at = sbase + n * p.hp;
                float s = ssm[at] * decay + dx * b_s[n];
                ssm[at] = s;
                acc += s * c_s[n];
            }
        }
        part_s[tid] = acc;
        barrier();
        if (lead) {
            float yv = 0.0;
            for (uint s = 0u; s < rs; s++) {
                yv += part_s[s * p.tile + c];
            }
            y[t * di + ch] = (yv + dskip * x) * silu(proj[t * p.ld + ch]);
        }
        barrier();
    }
}
