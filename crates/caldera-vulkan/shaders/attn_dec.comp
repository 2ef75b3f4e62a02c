#version 450
// Decode attention for one token at position pos = step[1], lane-parallel flash decoding
// (an alternative to attn_decode.comp, the default; the host runs it with
// CALDERA_VK_ATTN_DEC=1).
// Same bindings, push constants, flags and results as attn_decode.comp (see there); what
// differs is how a workgroup spends its time. Workgroup (g, c, s) takes query heads
// c * hpw .. (at most 8) of kv head g and block s of the window [lo, pos]. The block size
// is picked here from the step's position, not at record time: split = max(p.split,
// ceil(n / max_splits)) rounded up to a tile, so a short context spreads over as many
// workgroups as it has tiles (idle ones exit at once) and a long one over at most
// max_splits, each then looping over its tiles.
//
// A tile is T = WG / L positions, L lanes per k row (L = hd / 32 rounded up to a power of
// two, at least 2): every lane loads its slices of the tile's k rows (and, in the layout
// below, of its v rows) into registers at once, before anything that needs them, so the
// first tile's loads overlap the q/k norm + RoPE; the next tile's loads are issued before
// the current tile's softmax and values. Per tile:
//   scores: lane (row r, slice j) dots its k slice with every head's q slice (q in shared
//     memory, scaled), the L partial dots meet in shared memory;  [barrier]
//   a lane per (head, row) sums them (softcap) into sc;  [barrier]
//   the same lane takes the head's tile max (vec4 reads), rescales the running max and
//   writes exp(s - m) and the correction factor;  [barrier]
//   values: lane (row group rg, quad of dims dq) accumulates p * v over its rows for
//     every head in registers (8 vec4 at most), rescaled by the correction.
// The row groups' sums meet in shared memory once after the last tile. q/k norm + RoPE:
// one pass over (row, pair) loading values, weights and RoPE entries together, then the
// rows' 1 / rms (1 or 2 barriers), done by every block (each needs its q; the block
// holding pos also preps k and v and, for c == 0, writes them to the caches). A single
// block writes the output directly; otherwise each block writes partials (acc[hd] as
// vec4, then m, l) and the last block of (g, c) to finish (an atomic count, reset by that
// block) combines them, a lane per output quad reading 16 blocks' partials per batch of
// loads. F_Q8 quantizes the output to int8 blocks of 32 for the o-projection.
// The host (kernels::attn_dec_shape) checks the layout fits: 32 <= WG <= 128, hd a
// multiple of 4 up to 512, T >= 4, at most 8 value items and 8 (head, quad) sums per lane.
// Binding 0: qkv, 1: k cache, 2: v cache, 3: out, 4: step values ([1] position), 5: q norm,
// 6: k norm, 7: RoPE table, 8: q8 values, 9: q8 scales, 10: partials (f32: acc at
// ((head * max_splits + s) * hd), then m, l at n_heads * max_splits * hd + 2 (head *
// max_splits + s)), 11: counts (u32 per (g, c)), 12: sinks, 13: the page table (u32,
// kv.glsl's paging: a lane looks up the row it loads once per tile).
#define BATCH 0
#include "attn_dec.glsl"
