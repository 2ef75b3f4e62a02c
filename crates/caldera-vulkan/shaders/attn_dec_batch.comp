#version 450
// Batched decode attention, attn_dec.comp (see there) for each column c < step[0] of a
// batched decode step, every column a token of its own sequence: column c is the
// sequence in pool slot step[8 + 2c] at position step[9 + 2c]. Its q | k | v row is row c
// of qkv (ld_qkv apart), its output row c of out (n_heads * hd apart); its positions are
// the pool pages its slot's page table names (entries slot * slot_pages .. of binding 10),
// so a column writes only its own position's row and reads its own sequence's. Columns past step[0] (the bucket's padding) exit at once.
// Partials ((hd + 4) * n_heads * max_splits floats per column) and counts are per
// column. No int8 output (the batched o-projection then quantizes its input) or sinks (as
// attn_batch.comp, the default; this one runs with CALDERA_VK_ATTN_DEC=1); v norm (F_VNORM)
// and KV sharing (F_NOKV) as in attn_dec.comp.
// Binding 0: qkv, 1: k pool, 2: v pool, 3: out, 4: step values, 5: q norm, 6: k norm,
// 7: RoPE table, 8: partials, 9: counts (u32 per (column, g, c), zero between
// dispatches), 10: the page tables (u32).
#define BATCH 1
#include "attn_dec.glsl"
