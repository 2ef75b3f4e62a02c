//! The kernel table: every compute pipeline declared once, with its SPIR-V, bindings,
//! push-constant size and specialization constants.
//!
//! Conventions shared by every kernel (see `shaders/common.glsl`):
//! - bindings are storage buffers 0..`bindings`, all in descriptor set 0;
//! - specialization constant 0 is the workgroup size (x), a power of two;
//! - specialization constant 1 (mat-vec only) is the number of rows per workgroup;
//! - dispatches are 2D: the flat workgroup index is `y * groups_x + x`, so more
//!   workgroups than `maxComputeWorkGroupCount[0]` fit (vocabulary-sized LM heads).
//!
//! Each kernel is compiled twice: with subgroup-arithmetic reductions (`.sg.spv`) and
//! with shared-memory reductions only (`.sh.spv`), the fallback.

use caldera_format::GgmlType;

/// Every pipeline caldera creates. The discriminant indexes [`KERNELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RmsNorm = 0,
    MmF32 = 1,
    MmF16 = 2,
    MmBF16 = 3,
    MmQ4_0 = 4,
    MmQ4_1 = 5,
    MmQ5_0 = 6,
    MmQ5_1 = 7,
    MmQ8_0 = 8,
    MmQ4K = 9,
    MmQ5K = 10,
    MmQ6K = 11,
    MmIQ4XS = 12,
    RopeKv = 13,
    Attention = 14,
    AddNorm = 15,
    MmgF32 = 16,
    MmgF16 = 17,
    MmgBF16 = 18,
    MmgQ4_0 = 19,
    MmgQ4_1 = 20,
    MmgQ5_0 = 21,
    MmgQ5_1 = 22,
    MmgQ8_0 = 23,
    MmgQ4K = 24,
    MmgQ5K = 25,
    MmgQ6K = 26,
    MmgIQ4XS = 27,
    MvF32 = 28,
    MvF16 = 29,
    MvBF16 = 30,
    MvQ4_0 = 31,
    MvQ4_1 = 32,
    MvQ5_0 = 33,
    MvQ5_1 = 34,
    MvQ8_0 = 35,
    MvQ4K = 36,
    MvQ5K = 37,
    MvQ6K = 38,
    MvIQ4XS = 39,
    MvgF32 = 40,
    MvgF16 = 41,
    MvgBF16 = 42,
    MvgQ4_0 = 43,
    MvgQ4_1 = 44,
    MvgQ5_0 = 45,
    MvgQ5_1 = 46,
    MvgQ8_0 = 47,
    MvgQ4K = 48,
    MvgQ5K = 49,
    MvgQ6K = 50,
    MvgIQ4XS = 51,
    Copy = 52,
    QuantX = 53,
    MvqQ4_0 = 54,
    MvqQ8_0 = 55,
    MvqQ4K = 56,
    MvqQ6K = 57,
    MvqgQ4_0 = 58,
    MvqgQ8_0 = 59,
    MvqgQ4K = 60,
    MvqgQ6K = 61,
    MvqeQ4_0 = 62,
    MvqeQ8_0 = 63,
    MvqeQ4K = 64,
    MvqeQ6K = 65,
    MvqgeQ4_0 = 66,
    MvqgeQ8_0 = 67,
    MvqgeQ4K = 68,
    MvqgeQ6K = 69,
    AttnDecode = 70,
    GdnDecode = 71,
    Mamba2Decode = 72,
    ShortConvDecode = 73,
    ConvRows = 74,
    GdnChunk = 75,
    GdnNorm = 76,
    Mamba2Scan = 77,
    Mamba2Norm = 78,
    ShortConvRows = 79,
    MmtF32 = 80,
    MmtF16 = 81,
    MmtBF16 = 82,
    MmtQ4_0 = 83,
    MmtQ4_1 = 84,
    MmtQ5_0 = 85,
    MmtQ5_1 = 86,
    MmtQ8_0 = 87,
    MmtQ4K = 88,
    MmtQ5K = 89,
    MmtQ6K = 90,
    MmtIQ4XS = 91,
    AttnFlash = 92,
    RowsAct = 93,
    MoeRoute = 94,
    MvxF32 = 95,
    MvxF16 = 96,
    MvxBF16 = 97,
    MvxQ4_0 = 98,
    MvxQ4_1 = 99,
    MvxQ5_0 = 100,
    MvxQ5_1 = 101,
    MvxQ8_0 = 102,
    MvxQ4K = 103,
    MvxQ5K = 104,
    MvxQ6K = 105,
    MvxIQ4XS = 106,
    MvxgF32 = 107,
    MvxgF16 = 108,
    MvxgBF16 = 109,
    MvxgQ4_0 = 110,
    MvxgQ4_1 = 111,
    MvxgQ5_0 = 112,
    MvxgQ5_1 = 113,
    MvxgQ8_0 = 114,
    MvxgQ4K = 115,
    MvxgQ5K = 116,
    MvxgQ6K = 117,
    MvxgIQ4XS = 118,
    MvqxQ4_0 = 119,
    MvqxQ8_0 = 120,
    MvqxQ4K = 121,
    MvqxQ6K = 122,
    MvqxMXFP4 = 123,
    MvqxgQ4_0 = 124,
    MvqxgQ8_0 = 125,
    MvqxgQ4K = 126,
    MvqxgQ6K = 127,
    MvqxgMXFP4 = 128,
    MvqxeQ4_0 = 129,
    MvqxeQ8_0 = 130,
    MvqxeQ4K = 131,
    MvqxeQ6K = 132,
    MvqxeMXFP4 = 133,
    MvqxgeQ4_0 = 134,
    MvqxgeQ8_0 = 135,
    MvqxgeQ4K = 136,
    MvqxgeQ6K = 137,
    MvqxgeMXFP4 = 138,
    AttnBatch = 139,
    MvqnQ4_0 = 140,
    MvqnQ8_0 = 141,
    MvqnQ4K = 142,
    MvqnQ6K = 143,
    MvqneQ4_0 = 144,
    MvqneQ8_0 = 145,
    MvqneQ4K = 146,
    MvqneQ6K = 147,
    QuantRows = 148,
    RowsExt = 149,
    PleIn = 150,
    MvqmQ4_0 = 151,
    MvqmQ8_0 = 152,
    MvqmQ4K = 153,
    MvqmQ6K = 154,
    MvqmeQ4_0 = 155,
    MvqmeQ8_0 = 156,
    MvqmeQ4K = 157,
    MvqmeQ6K = 158,
    MvrF32 = 159,
    MvrF16 = 160,
    MvrBF16 = 161,
    MvrQ4_0 = 162,
    MvrQ4_1 = 163,
    MvrQ5_0 = 164,
    MvrQ5_1 = 165,
    MvrQ8_0 = 166,
    MvrQ4K = 167,
    MvrQ5K = 168,
    MvrQ6K = 169,
    MvrIQ4XS = 170,
    AttnDec = 171,
    AttnDecBatch = 172,
    Mamba2Chunk = 173,
    MoeGroup = 174,
    MmxF32 = 175,
    MmxF16 = 176,
    MmxBF16 = 177,
    MmxQ4_0 = 178,
    MmxQ4_1 = 179,
    MmxQ5_0 = 180,
    MmxQ5_1 = 181,
    MmxQ8_0 = 182,
    MmxQ4K = 183,
    MmxQ5K = 184,
    MmxQ6K = 185,
    MmxIQ4XS = 186,
    MoeSum = 187,
    MmcF32 = 188,
    MmcF16 = 189,
    MmcBF16 = 190,
    MmcQ4_0 = 191,
    MmcQ4_1 = 192,
    MmcQ5_0 = 193,
    MmcQ5_1 = 194,
    MmcQ8_0 = 195,
    MmcQ4K = 196,
    MmcQ5K = 197,
    MmcQ6K = 198,
    MmcIQ4XS = 199,
    Argmax = 200,
    Mvqm8Q4_0 = 201,
    Mvqm8Q8_0 = 202,
    Mvqm8Q4K = 203,
    Mvqm8Q6K = 204,
    Mvqm8eQ4_0 = 205,
    Mvqm8eQ8_0 = 206,
    Mvqm8eQ4K = 207,
    Mvqm8eQ6K = 208,
    MvqbQ4_0 = 209,
    MvqbQ8_0 = 210,
    MvqbQ4K = 211,
    MvqbQ6K = 212,
    MvqbgQ4_0 = 213,
    MvqbgQ8_0 = 214,
    MvqbgQ4K = 215,
    MvqbgQ6K = 216,
    MvqbeQ4_0 = 217,
    MvqbeQ8_0 = 218,
    MvqbeQ4K = 219,
    MvqbeQ6K = 220,
    MvqbgeQ4_0 = 221,
    MvqbgeQ8_0 = 222,
    MvqbgeQ4K = 223,
    MvqbgeQ6K = 224,
    MvqwQ4_0 = 225,
    MvqwQ8_0 = 226,
    MvqwQ4K = 227,
    MvqwQ6K = 228,
    MvqwgQ4_0 = 229,
    MvqwgQ8_0 = 230,
    MvqwgQ4K = 231,
    MvqwgQ6K = 232,
    MvqweQ4_0 = 233,
    MvqweQ8_0 = 234,
    MvqweQ4K = 235,
    MvqweQ6K = 236,
    MvqwgeQ4_0 = 237,
    MvqwgeQ8_0 = 238,
    MvqwgeQ4K = 239,
    MvqwgeQ6K = 240,
    HalfRows = 241,
    MvcF32 = 242,
    MvcF16 = 243,
    MvcBF16 = 244,
    MvcQ4_0 = 245,
    MvcQ4_1 = 246,
    MvcQ5_0 = 247,
    MvcQ5_1 = 248,
    MvcQ8_0 = 249,
    MvcQ4K = 250,
    MvcQ5K = 251,
    MvcQ6K = 252,
    MvcIQ4XS = 253,
    MvcfF32 = 254,
    MvcfF16 = 255,
    MvcfBF16 = 256,
    MvcfQ4_0 = 257,
    MvcfQ4_1 = 258,
    MvcfQ5_0 = 259,
    MvcfQ5_1 = 260,
    MvcfQ8_0 = 261,
    MvcfQ4K = 262,
    MvcfQ5K = 263,
    MvcfQ6K = 264,
    MvcfIQ4XS = 265,
    Chain = 266,
}

/// One entry of the kernel table.
#[derive(Clone, Copy, Debug)]
pub struct KernelDesc {
    pub kernel: Kernel,
    pub name: &'static str,
    /// SPIR-V reducing with subgroup arithmetic.
    pub spirv_subgroup: &'static [u8],
    /// SPIR-V reducing through shared memory only.
    pub spirv_shared: &'static [u8],
    /// Storage-buffer bindings 0..bindings.
    pub bindings: u32,
    /// Bytes of push constants.
    pub push_bytes: u32,
    /// Whether specialization constant 1 (rows per workgroup) applies.
    pub rows_per_group: bool,
    /// A decode mat-vec (`mv.glsl`, `mvq.glsl`): specialised with
    /// [`Tuning::mv_workgroup_size`] and [`Tuning::mv_rows`] instead.
    pub mv: bool,
    /// Uses int8 dot-product instructions: its pipeline exists only where
    /// [`Tuning::int8_dot`] holds.
    pub int8_dot: bool,
    /// A gate|up decode mat-vec: launched with [`Tuning::mv_shape`]`(true)`.
    pub glu: bool,
    /// An expert mat-vec (`mvx*`, `mvqx*`): launched with [`Tuning::mvx_shape`].
    pub expert: bool,
    /// A decode mat-vec on int8 activations (`mvq.glsl`, not an expert one): launched
    /// with [`Tuning::mvq_shape`].
    pub q8: bool,
    /// A fixed workgroup size (`local_size_x` in the shader, no specialization constant
    /// 0), or 0 for [`Tuning::workgroup_size`].
    pub invocations: u32,
    /// Bytes of shared memory it declares beyond 16 KiB (Vulkan's guaranteed minimum)
    /// or 0: its pipeline exists only on devices with that much.
    pub shared_bytes: u32,
    /// Multiplies cooperative matrices (one SPIR-V for both reductions): its pipeline
    /// exists only where [`Tuning::coopmat`] holds a shape, specialised with it
    /// (constants 4-8).
    pub coopmat: bool,
    /// The batched decode mat-vec on cooperative matrices (`mvc.glsl`): also
    /// specialised with the subgroup size (constant 13); runs where [`Tuning::mvc`]
    /// holds.
    pub mvc: bool,
    /// A cooperative-matrix kernel built for 16 x 16 x 16 matrices in 32-lane subgroups
    /// (`mvcf_*`): runs only where [`Tuning::mvc_fixed`] holds.
    pub coop_fixed: bool,
    /// An int8 decode mat-vec whose workgroups count (or, 32 outputs each, do) the
    /// next mat-vec's input quantization per workgroup rather than per output
    /// (`mvq.glsl`'s `MV_BLK`, specialization constant 12): the same SPIR-V as its
    /// `mvq*` twin, launched with [`Tuning::mvb_workgroup_size`]; its pipeline exists
    /// only where [`Tuning::mv_block`] is on.
    pub blk: bool,
    /// A block-tail mat-vec of 32 subgroups per workgroup, which quantizes its block
    /// inside the workgroup ([`Tuning::mv_wide`]).
    pub wide: bool,
    /// An expert mat-vec on int8 activations (`mvqx*`): launched with
    /// [`Tuning::mvqx_shape`], in the subgroup-per-output layout (specialization
    /// constant 3) where [`Tuning::mvx_subgroup`] holds.
    pub expert_q8: bool,
}

/// `d`, marked as a gate|up decode mat-vec.
const fn glu(mut d: KernelDesc) -> KernelDesc {
    d.glu = true;
    d
}

macro_rules! spv {
    ($name:literal) => {
        (
            include_bytes!(concat!("../shaders/spv/", $name, ".sg.spv")).as_slice(),
            include_bytes!(concat!("../shaders/spv/", $name, ".sh.spv")).as_slice(),
        )
    };
}

/// A cooperative-matrix kernel's one SPIR-V (built by glslang, `build-shaders.sh`),
/// standing for both reductions.
macro_rules! spv_coop {
    ($name:literal) => {
        (
            include_bytes!(concat!("../shaders/spv/", $name, ".spv")).as_slice(),
            include_bytes!(concat!("../shaders/spv/", $name, ".spv")).as_slice(),
        )
    };
}

/// RMSNorm push constants: `n: u32, rows: u32, eps: f32`.
pub const RMSNORM_PUSH_BYTES: u32 = 12;

/// Batched mat-vec (`mm.glsl`) push constants: `k, rows, y_offset, ld_x, ld_y, flags`
/// (u32), `eps, cap` (f32).
pub const MM_PUSH_BYTES: u32 = 32;
/// `rope_kv` push constants: `n_heads, n_kv, hd, n_rot, flags, ld_qkv` (u32), `eps` (f32).
pub const ROPE_KV_PUSH_BYTES: u32 = 28;
/// `attention` push constants: `n_heads, n_kv, hd, hpw, n_chunks, window, ld_qkv` (u32),
/// `scale, softcap` (f32), `sinks` (u32).
pub const ATTENTION_PUSH_BYTES: u32 = 40;
/// `attn_flash` push constants: [`ATTENTION_PUSH_BYTES`]'s words but `sinks`, then
/// `bq, bkv, sinks` (u32).
pub const ATTN_FLASH_PUSH_BYTES: u32 = 48;
/// `attn_decode` push constants: `n_heads, n_kv, hd, n_rot, flags, ld_qkv, window, hpw,
/// n_chunks, max_splits, split` (u32), `eps, scale, softcap` (f32).
pub const ATTN_DECODE_PUSH_BYTES: u32 = 56;
/// `attn_batch` push constants: [`ATTN_DECODE_PUSH_BYTES`]'s words, then `slot_pages`
/// (u32: page-table entries per pool slot, [`crate::KV_PAGE`] positions a page). Flag 16: also write the output as int8 blocks (bindings 10, 11) for the
/// batched o-projection.
pub const ATTN_BATCH_PUSH_BYTES: u32 = 60;
/// `mvqn_*` push constants: `k, rows, y_offset, ld_y, flags` (u32), `cap` (f32).
pub const MVQN_PUSH_BYTES: u32 = 24;
/// `quant_rows` push constants: `k, flags` (u32), `eps` (f32), `ld_x, gpr` (u32).
pub const QUANT_ROWS_PUSH_BYTES: u32 = 20;
/// `mvqm_*` push constants: [`MVQN_PUSH_BYTES`]'s words, then `ncg` (u32: column groups
/// per row group).
pub const MVQM_PUSH_BYTES: u32 = MVQN_PUSH_BYTES + 4;

/// Positions per workgroup of `attn_decode` for a sequence of `cap` tokens: 32 (many
/// small splits keep short contexts parallel), growing up to 128 so that no more than
/// 128 splits per kv head are dispatched.
pub fn attn_split(cap: usize) -> usize {
    cap.div_ceil(128).next_multiple_of(32).clamp(32, 128)
}
/// The launch shape of `attn_dec` (lane-parallel decode attention) for one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDecShape {
    /// Query heads per workgroup (at most 8).
    pub hpw: usize,
    /// Workgroups per kv head taking its query heads: ceil(group size / hpw).
    pub n_chunks: usize,
    /// Blocks of positions dispatched per (kv head, chunk) (`max_splits`); the kernel
    /// uses ceil(context / split) of them, split from the step's position.
    pub blocks: usize,
    /// Fewest positions per block (`split`; the kernel rounds it up to its tile).
    pub split: usize,
    /// Positions per tile: `wg / lanes per k row`.
    pub tile: usize,
}

/// Shared memory of `attn_dec` / `attn_dec_batch`: q / output rows, the scratch (score
/// partials, value sums, the token's k and v rows), scores and weights, per-head max and
/// correction, a flag, and a reduction slot per invocation (workgroups of at most 128).
const ATTN_DEC_SHARED_BYTES: u32 = (2048 + 4096 + 512 + 512 + 32 + 1 + 128) * 4;

/// Default blocks per (kv head, chunk) of `attn_dec` (`CALDERA_VK_ATTN_SPLITS`): past
/// 64 tiles of context a block loops over several tiles instead of adding blocks, which
/// keeps the last block's combine (it reads every block's partials) short.
pub const ATTN_DEC_BLOCKS: usize = 64;

/// `attn_dec`'s launch shape for query groups of `gsize` heads of `hd` values, a
/// workgroup of `wg` invocations and a sequence of `cap` positions, or `None` where its
/// register layout does not fit (then `attn_decode` runs). `hpw` (at most 8) caps the
/// query heads per workgroup, `split` is the fewest positions per block (0: one tile),
/// `blocks` the most blocks per (kv head, chunk) (0: [`ATTN_DEC_BLOCKS`]). Mirrors the
/// layout at the top of `attn_dec.comp`: L lanes per k row (hd / 32 rounded up to a power
/// of two, 2 to 16), tiles of wg / L rows, and in the value phase each lane holds at most
/// 8 (row, quad) items and 8 (head, quad) sums.
pub fn attn_dec_shape(
    gsize: usize,
    hd: usize,
    wg: u32,
    cap: usize,
    hpw: usize,
    split: usize,
    blocks: usize,
) -> Option<AttnDecShape> {
    let wg = wg as usize;
    if !(32..=128).contains(&wg) || !wg.is_power_of_two() || hd == 0 || hd > 512 {
        return None;
    }
    if !hd.is_multiple_of(4) || gsize == 0 {
        return None;
    }
    let l = match hd {
        0..=64 => 2,
        65..=128 => 4,
        129..=256 => 8,
        _ => 16,
    };
    let tile = wg / l;
    if tile < 4 {
        return None;
    }
    let nq = hd / 4;
    let (rg, qpl) = if nq <= wg {
        (wg / nq, 1)
    } else {
        (1, nq.div_ceil(wg))
    };
    let vr = tile.div_ceil(rg);
    if vr * qpl > 8 || nq.div_ceil(l) > 8 {
        return None;
    }
    let hpw = gsize
        .min(hpw.clamp(1, 8))
        .min(2048 / hd)
        .min(8 / qpl)
        .max(1);
    let split = split.max(tile).next_multiple_of(tile);
    let blocks = if blocks == 0 { ATTN_DEC_BLOCKS } else { blocks };
    Some(AttnDecShape {
        hpw,
        n_chunks: gsize.div_ceil(hpw),
        blocks: cap.div_ceil(split).clamp(1, blocks.max(1)),
        split,
        tile,
    })
}

/// `add_norm` push constants: `n` (u32), `eps` (f32).
pub const ADD_NORM_PUSH_BYTES: u32 = 8;
/// `gdn_decode` push constants: `n_k, n_v, dk, dv, kern, flags, tile, n_tiles` (u32),
/// `eps` (f32), `ld_proj, ring_stride, ssm_stride` (u32; batched steps).
pub const GDN_DECODE_PUSH_BYTES: u32 = 48;
/// `mamba2_decode` push constants: `n_h, hp, ns, n_g, kern, tile, n_tiles, flags` (u32),
/// `eps, dt_min` (f32), `ld_proj, ring_stride, ssm_stride` (u32; batched steps).
pub const MAMBA2_DECODE_PUSH_BYTES: u32 = 52;
/// `shortconv_decode` push constants: `channels, kern, flags, ld_proj, state_stride`
/// (u32; the last two for batched steps).
pub const SHORTCONV_DECODE_PUSH_BYTES: u32 = 20;
/// `conv_rows` push constants: `cd, kern, ld, max_t, src` (u32).
pub const CONV_ROWS_PUSH_BYTES: u32 = 20;
/// `gdn_chunk` push constants: `n_k, n_v, dk, dv, kern, flags, ld, n_tiles, max_t` (u32).
pub const GDN_CHUNK_PUSH_BYTES: u32 = 36;
/// `gdn_norm` push constants: `n_v, dv, cd, ld, norm_at` (u32), `eps` (f32).
pub const GDN_NORM_PUSH_BYTES: u32 = 24;
/// `mamba2_scan` push constants: `n_h, hp, ns, n_g, tile, n_tiles, ld, max_t, pb` (u32),
/// `dt_min` (f32).
pub const MAMBA2_SCAN_PUSH_BYTES: u32 = 40;
/// `mamba2_norm` push constants: `n_g, gs, norm_at` (u32), `eps` (f32).
pub const MAMBA2_NORM_PUSH_BYTES: u32 = 16;
/// `mamba2_chunk` push constants: `n_h, hp, ns, n_g, n_tiles, ld, max_t, pb` (u32),
/// `dt_min` (f32).
pub const MAMBA2_CHUNK_PUSH_BYTES: u32 = 36;
/// `mamba2_chunk`'s fixed shape: head channels per workgroup (`TP`).
pub const MAMBA2_CHUNK_CHANNELS: usize = 32;
/// `shortconv_rows` push constants: `channels, kern, ld, max_t` (u32).
pub const SHORTCONV_ROWS_PUSH_BYTES: u32 = 16;
/// `rows_act` push constants: `n, ld_y, ld_src, src_off, mode, max_t` (u32).
pub const ROWS_ACT_PUSH_BYTES: u32 = 24;
/// `rows_ext` push constants: `n, ld_y, y_off, ld_src, src_off, mode, max_t` (u32),
/// `scale` (f32).
pub const ROWS_EXT_PUSH_BYTES: u32 = 32;
/// `argmax` push constants: `n, ld, rows, parts, span` (u32).
pub const ARGMAX_PUSH_BYTES: u32 = 20;
/// `ple_in` push constants: `n_layers, dpl` (u32), `eps, proj_scale, tok_scale,
/// input_scale` (f32).
pub const PLE_IN_PUSH_BYTES: u32 = 24;

const fn mm(kernel: Kernel, name: &'static str, spv: (&'static [u8], &'static [u8])) -> KernelDesc {
    KernelDesc {
        rows_per_group: true,
        ..plain(kernel, name, spv, 5, MM_PUSH_BYTES)
    }
}

const fn plain(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
    bindings: u32,
    push_bytes: u32,
) -> KernelDesc {
    KernelDesc {
        kernel,
        name,
        spirv_subgroup: spv.0,
        spirv_shared: spv.1,
        bindings,
        push_bytes,
        rows_per_group: false,
        mv: false,
        int8_dot: false,
        glu: false,
        expert: false,
        q8: false,
        invocations: 0,
        shared_bytes: 0,
        coopmat: false,
        mvc: false,
        coop_fixed: false,
        blk: false,
        wide: false,
        expert_q8: false,
    }
}

/// Tiled prefill matmul (`mmt.glsl`) push constants: [`MM_PUSH_BYTES`]'s words, then
/// `ttiles` (u32, token tiles per row tile).
pub const MMT_PUSH_BYTES: u32 = 36;
/// Tiled matmul tile: weight rows and tokens per workgroup (`BM`, `BN` of `mmt.glsl`).
pub const MMT_ROWS: u64 = 128;
pub const MMT_TOKENS: u64 = 64;
/// Elements of k per step of the tiled matmuls (`BK`).
pub const MMT_K_STEP: u64 = 32;

const fn mmt(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        invocations: 256,
        // A and B tiles (16 + 8 KiB), the norm's partial sums and scales.
        shared_bytes: 16384 + 8192 + 1024 + 256,
        ..plain(kernel, name, spv, 5, MMT_PUSH_BYTES)
    }
}

/// The tiled prefill matmul on cooperative matrices (`mmc.glsl`, `mmc_*`): `mmt`'s
/// bindings, push constants, tile and dispatch.
const fn mmc(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        // f16 A and B tiles (10 + 5 KiB), the epilogue's staging (8 KiB), the norm's
        // partial sums and scales.
        shared_bytes: 10240 + 5120 + 8192 + 1024 + 256,
        coopmat: true,
        ..mmt(kernel, name, spv)
    }
}

/// `half_rows` push constants: `k, flags` (u32), `eps` (f32), `ld_x, gpr` (u32).
pub const HALF_ROWS_PUSH_BYTES: u32 = 20;

/// The batched decode mat-vec on cooperative matrices (`mvc.glsl`, `mvc_*`) push
/// constants: `k, rows, y_offset, ld_y, flags` (u32), `cap` (f32).
pub const MVC_PUSH_BYTES: u32 = 24;

/// Weight rows per workgroup of `mvc.glsl` (`RT`).
pub const MVC_ROWS: u64 = 32;
/// Columns of `mvc.glsl`'s output tile (`TN`).
pub const MVC_COLS: u64 = 16;

/// Elements per round of `mvc.glsl` (`RK`) in subgroups of at least `sgs` lanes: `k`
/// must be a multiple.
pub const fn mvc_k_step(sgs: u32) -> u64 {
    2 * sgs as u64
}

/// `mvc.glsl`'s shared memory for `wg` invocations in subgroups of at least `sgs` lanes:
/// per subgroup a 32 x (RK + 8) f16 tile, which later holds its 32 x 16 f32 partial sums.
pub const fn mvc_shared_bytes(wg: u32, sgs: u32) -> u32 {
    let tile = 32 * (2 * sgs + 8) * 2;
    let sums = 32 * 16 * 4;
    (wg / sgs) * if tile > sums { tile } else { sums }
}

/// The batched decode mat-vec on cooperative matrices (`mvc.glsl`): workgroups of
/// [`Tuning::mvc_subgroups`] subgroups, specialised with the device's shape (constants 4-6) and
/// the subgroup size (13); runs where [`Tuning::mvc`] holds.
const fn mvc(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        coopmat: true,
        mvc: true,
        ..plain(kernel, name, spv, 4, MVC_PUSH_BYTES)
    }
}

/// `d` built for 16 x 16 x 16 matrices in 32-lane subgroups only
/// ([`KernelDesc::coop_fixed`]).
const fn fixed16(d: KernelDesc) -> KernelDesc {
    KernelDesc {
        coop_fixed: true,
        ..d
    }
}

/// The grouped expert matmul (`mmt.glsl` with `MMT_EXPERT`, `mmx_*`) push constants:
/// `k, rows, e0, ld_x, ld_y, flags` (u32), `eps, alpha, limit` (f32), `ne, x_div, n_used,
/// pt, rtiles, max_tiles, pairs_at, slot0` (u32).
pub const MMX_PUSH_BYTES: u32 = 68;

const fn mmx(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        bindings: 7,
        push_bytes: MMX_PUSH_BYTES,
        ..mmt(kernel, name, spv)
    }
}

/// `moe_group` push constants: `n, k, pt, max_tokens, max_tiles, pairs_at, offs_at,
/// slot0` (u32).
pub const MOE_GROUP_PUSH_BYTES: u32 = 32;
/// `moe_sum` push constants: `d, k, with_shared` (u32).
pub const MOE_SUM_PUSH_BYTES: u32 = 12;

/// Decode mat-vec (`mv.glsl`) push constants: `k, rows, y_offset, flags` (u32),
/// `eps, cap` (f32).
pub const MV_PUSH_BYTES: u32 = 24;

const fn mv(kernel: Kernel, name: &'static str, spv: (&'static [u8], &'static [u8])) -> KernelDesc {
    KernelDesc {
        rows_per_group: true,
        mv: true,
        ..plain(kernel, name, spv, 4, MV_PUSH_BYTES)
    }
}

/// `quant_x` push constants: `k, flags` (u32), `eps` (f32).
pub const QUANT_X_PUSH_BYTES: u32 = 12;
/// Int8-activation decode mat-vec (`mvq.glsl`) push constants: `k, rows, y_offset,
/// flags` (u32), `cap` (f32), `n_next` (u32), `eps` (f32).
pub const MVQ_PUSH_BYTES: u32 = 28;

const fn mvq(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
    int8_dot: bool,
) -> KernelDesc {
    KernelDesc {
        rows_per_group: true,
        mv: true,
        q8: true,
        int8_dot,
        ..plain(kernel, name, spv, 10, MVQ_PUSH_BYTES)
    }
}

/// `d`, marked as a block-tail mat-vec (see [`KernelDesc::blk`]).
const fn blk(mut d: KernelDesc) -> KernelDesc {
    d.blk = true;
    d
}

/// `d`, marked as a wide block-tail mat-vec (see [`KernelDesc::wide`]).
const fn wide(mut d: KernelDesc) -> KernelDesc {
    d.wide = true;
    blk(d)
}

/// A batched decode mat-vec on int8 activations (`mvqn.glsl`): the context's workgroup
/// size, 4 rows per workgroup.
const fn mvqn(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
    int8_dot: bool,
) -> KernelDesc {
    KernelDesc {
        int8_dot,
        ..plain(kernel, name, spv, 5, MVQN_PUSH_BYTES)
    }
}

/// The grouped batched decode mat-vec (`mvqn.glsl` with `MVQN_GROUPED`): 4 or 8 rows x
/// 8 columns per workgroup, one reduction pass; binding 5: the activations' block sums.
const fn mvqm(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
    int8_dot: bool,
) -> KernelDesc {
    KernelDesc {
        int8_dot,
        ..plain(kernel, name, spv, 6, MVQM_PUSH_BYTES)
    }
}

/// `moe_route` push constants: `n, k, kind, flags` (u32), `scale` (f32), `ld` (u32).
pub const MOE_ROUTE_PUSH_BYTES: u32 = 24;
/// Expert mat-vec on f32 activations (`mv.glsl` with `MV_EXPERT`) push constants:
/// [`MV_PUSH_BYTES`]'s words, then `rpe, slots, slot0, e0, ne, x_stride, y_stride` (u32),
/// `alpha, limit` (f32), `x_div, id_stride` (u32) (`mv_expert_push.glsl`).
pub const MVX_PUSH_BYTES: u32 = MV_PUSH_BYTES + 44;
/// Expert mat-vec on int8 activations (`mvq.glsl` with `MV_EXPERT`) push constants:
/// [`MVQ_PUSH_BYTES`]'s words, then those [`MVX_PUSH_BYTES`] adds.
pub const MVQX_PUSH_BYTES: u32 = MVQ_PUSH_BYTES + 44;

/// An expert decode mat-vec on f32 activations: [`mv`] with 3 more bindings (ids,
/// weights, bias).
const fn mvx(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        bindings: 7,
        push_bytes: MVX_PUSH_BYTES,
        expert: true,
        ..mv(kernel, name, spv)
    }
}

/// An expert decode mat-vec on int8 activations: [`mvq`] with 3 more bindings.
const fn mvqx(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
    int8_dot: bool,
) -> KernelDesc {
    KernelDesc {
        bindings: 13,
        push_bytes: MVQX_PUSH_BYTES,
        expert: true,
        expert_q8: true,
        q8: false,
        ..mvq(kernel, name, spv, int8_dot)
    }
}

/// The MoE router mat-vec whose last workgroup routes (`mv.glsl` with `MV_ROUTE`) push
/// constants: [`MV_PUSH_BYTES`]'s words, then `n_exp, n_used, kind, flags` (u32),
/// `scale` (f32).
pub const MVR_PUSH_BYTES: u32 = MV_PUSH_BYTES + 20;

/// A fused router mat-vec: [`mv`] with 5 more bindings (logit bias, selection bias, ids,
/// weights, the count).
const fn mvr(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        bindings: 9,
        push_bytes: MVR_PUSH_BYTES,
        ..mv(kernel, name, spv)
    }
}

/// The kernel table, indexed by `Kernel as usize`.
pub static KERNELS: [KernelDesc; 267] = [
    plain(
        Kernel::RmsNorm,
        "rms_norm",
        spv!("rms_norm"),
        3,
        RMSNORM_PUSH_BYTES,
    ),
    mm(Kernel::MmF32, "mm_f32", spv!("mm_f32")),
    mm(Kernel::MmF16, "mm_f16", spv!("mm_f16")),
    mm(Kernel::MmBF16, "mm_bf16", spv!("mm_bf16")),
    mm(Kernel::MmQ4_0, "mm_q4_0", spv!("mm_q4_0")),
    mm(Kernel::MmQ4_1, "mm_q4_1", spv!("mm_q4_1")),
    mm(Kernel::MmQ5_0, "mm_q5_0", spv!("mm_q5_0")),
    mm(Kernel::MmQ5_1, "mm_q5_1", spv!("mm_q5_1")),
    mm(Kernel::MmQ8_0, "mm_q8_0", spv!("mm_q8_0")),
    mm(Kernel::MmQ4K, "mm_q4_k", spv!("mm_q4_k")),
    mm(Kernel::MmQ5K, "mm_q5_k", spv!("mm_q5_k")),
    mm(Kernel::MmQ6K, "mm_q6_k", spv!("mm_q6_k")),
    mm(Kernel::MmIQ4XS, "mm_iq4_xs", spv!("mm_iq4_xs")),
    plain(
        Kernel::RopeKv,
        "rope_kv",
        spv!("rope_kv"),
        8,
        ROPE_KV_PUSH_BYTES,
    ),
    plain(
        Kernel::Attention,
        "attention",
        spv!("attention"),
        7,
        ATTENTION_PUSH_BYTES,
    ),
    plain(
        Kernel::AddNorm,
        "add_norm",
        spv!("add_norm"),
        4,
        ADD_NORM_PUSH_BYTES,
    ),
    mm(Kernel::MmgF32, "mmg_f32", spv!("mmg_f32")),
    mm(Kernel::MmgF16, "mmg_f16", spv!("mmg_f16")),
    mm(Kernel::MmgBF16, "mmg_bf16", spv!("mmg_bf16")),
    mm(Kernel::MmgQ4_0, "mmg_q4_0", spv!("mmg_q4_0")),
    mm(Kernel::MmgQ4_1, "mmg_q4_1", spv!("mmg_q4_1")),
    mm(Kernel::MmgQ5_0, "mmg_q5_0", spv!("mmg_q5_0")),
    mm(Kernel::MmgQ5_1, "mmg_q5_1", spv!("mmg_q5_1")),
    mm(Kernel::MmgQ8_0, "mmg_q8_0", spv!("mmg_q8_0")),
    mm(Kernel::MmgQ4K, "mmg_q4_k", spv!("mmg_q4_k")),
    mm(Kernel::MmgQ5K, "mmg_q5_k", spv!("mmg_q5_k")),
    mm(Kernel::MmgQ6K, "mmg_q6_k", spv!("mmg_q6_k")),
    mm(Kernel::MmgIQ4XS, "mmg_iq4_xs", spv!("mmg_iq4_xs")),
    mv(Kernel::MvF32, "mv_f32", spv!("mv_f32")),
    mv(Kernel::MvF16, "mv_f16", spv!("mv_f16")),
    mv(Kernel::MvBF16, "mv_bf16", spv!("mv_bf16")),
    mv(Kernel::MvQ4_0, "mv_q4_0", spv!("mv_q4_0")),
    mv(Kernel::MvQ4_1, "mv_q4_1", spv!("mv_q4_1")),
    mv(Kernel::MvQ5_0, "mv_q5_0", spv!("mv_q5_0")),
    mv(Kernel::MvQ5_1, "mv_q5_1", spv!("mv_q5_1")),
    mv(Kernel::MvQ8_0, "mv_q8_0", spv!("mv_q8_0")),
    mv(Kernel::MvQ4K, "mv_q4_k", spv!("mv_q4_k")),
    mv(Kernel::MvQ5K, "mv_q5_k", spv!("mv_q5_k")),
    mv(Kernel::MvQ6K, "mv_q6_k", spv!("mv_q6_k")),
    mv(Kernel::MvIQ4XS, "mv_iq4_xs", spv!("mv_iq4_xs")),
    glu(mv(Kernel::MvgF32, "mvg_f32", spv!("mvg_f32"))),
    glu(mv(Kernel::MvgF16, "mvg_f16", spv!("mvg_f16"))),
    glu(mv(Kernel::MvgBF16, "mvg_bf16", spv!("mvg_bf16"))),
    glu(mv(Kernel::MvgQ4_0, "mvg_q4_0", spv!("mvg_q4_0"))),
    glu(mv(Kernel::MvgQ4_1, "mvg_q4_1", spv!("mvg_q4_1"))),
    glu(mv(Kernel::MvgQ5_0, "mvg_q5_0", spv!("mvg_q5_0"))),
    glu(mv(Kernel::MvgQ5_1, "mvg_q5_1", spv!("mvg_q5_1"))),
    glu(mv(Kernel::MvgQ8_0, "mvg_q8_0", spv!("mvg_q8_0"))),
    glu(mv(Kernel::MvgQ4K, "mvg_q4_k", spv!("mvg_q4_k"))),
    glu(mv(Kernel::MvgQ5K, "mvg_q5_k", spv!("mvg_q5_k"))),
    glu(mv(Kernel::MvgQ6K, "mvg_q6_k", spv!("mvg_q6_k"))),
    glu(mv(Kernel::MvgIQ4XS, "mvg_iq4_xs", spv!("mvg_iq4_xs"))),
    plain(Kernel::Copy, "copy", spv!("copy"), 2, 4),
    plain(
        Kernel::QuantX,
        "quant_x",
        spv!("quant_x"),
        4,
        QUANT_X_PUSH_BYTES,
    ),
    mvq(Kernel::MvqQ4_0, "mvq_q4_0", spv!("mvq_q4_0"), true),
    mvq(Kernel::MvqQ8_0, "mvq_q8_0", spv!("mvq_q8_0"), true),
    mvq(Kernel::MvqQ4K, "mvq_q4_k", spv!("mvq_q4_k"), true),
    mvq(Kernel::MvqQ6K, "mvq_q6_k", spv!("mvq_q6_k"), true),
    glu(mvq(Kernel::MvqgQ4_0, "mvqg_q4_0", spv!("mvqg_q4_0"), true)),
    glu(mvq(Kernel::MvqgQ8_0, "mvqg_q8_0", spv!("mvqg_q8_0"), true)),
    glu(mvq(Kernel::MvqgQ4K, "mvqg_q4_k", spv!("mvqg_q4_k"), true)),
    glu(mvq(Kernel::MvqgQ6K, "mvqg_q6_k", spv!("mvqg_q6_k"), true)),
    mvq(Kernel::MvqeQ4_0, "mvqe_q4_0", spv!("mvqe_q4_0"), false),
    mvq(Kernel::MvqeQ8_0, "mvqe_q8_0", spv!("mvqe_q8_0"), false),
    mvq(Kernel::MvqeQ4K, "mvqe_q4_k", spv!("mvqe_q4_k"), false),
    mvq(Kernel::MvqeQ6K, "mvqe_q6_k", spv!("mvqe_q6_k"), false),
    glu(mvq(
        Kernel::MvqgeQ4_0,
        "mvqge_q4_0",
        spv!("mvqge_q4_0"),
        false,
    )),
    glu(mvq(
        Kernel::MvqgeQ8_0,
        "mvqge_q8_0",
        spv!("mvqge_q8_0"),
        false,
    )),
    glu(mvq(
        Kernel::MvqgeQ4K,
        "mvqge_q4_k",
        spv!("mvqge_q4_k"),
        false,
    )),
    glu(mvq(
        Kernel::MvqgeQ6K,
        "mvqge_q6_k",
        spv!("mvqge_q6_k"),
        false,
    )),
    KernelDesc {
        // q, k row, score and k / v tile arrays (attn_decode.comp), a few per-head
        // values, a reduction slot per invocation (up to 256) and the split's pages.
        shared_bytes: (2048 + 512 + 1024 + 4224 + 32 + 1 + 256 + 9) * 4,
        ..plain(
            Kernel::AttnDecode,
            "attn_decode",
            spv!("attn_decode"),
            14,
            ATTN_DECODE_PUSH_BYTES,
        )
    },
    plain(
        Kernel::GdnDecode,
        "gdn_decode",
        spv!("gdn_decode"),
        10,
        GDN_DECODE_PUSH_BYTES,
    ),
    plain(
        Kernel::Mamba2Decode,
        "mamba2_decode",
        spv!("mamba2_decode"),
        10,
        MAMBA2_DECODE_PUSH_BYTES,
    ),
    plain(
        Kernel::ShortConvDecode,
        "shortconv_decode",
        spv!("shortconv_decode"),
        5,
        SHORTCONV_DECODE_PUSH_BYTES,
    ),
    plain(
        Kernel::ConvRows,
        "conv_rows",
        spv!("conv_rows"),
        5,
        CONV_ROWS_PUSH_BYTES,
    ),
    KernelDesc {
        // The chunk's 64 x 64 products, q / k slices of 64 x 16, five per-token vectors
        // of 64 and a reduction slot per invocation (up to 256).
        shared_bytes: (64 * 64 + 2 * 64 * 16 + 5 * 64 + 256) * 4,
        ..plain(
            Kernel::GdnChunk,
            "gdn_chunk",
            spv!("gdn_chunk"),
            7,
            GDN_CHUNK_PUSH_BYTES,
        )
    },
    plain(
        Kernel::GdnNorm,
        "gdn_norm",
        spv!("gdn_norm"),
        4,
        GDN_NORM_PUSH_BYTES,
    ),
    plain(
        Kernel::Mamba2Scan,
        "mamba2_scan",
        spv!("mamba2_scan"),
        6,
        MAMBA2_SCAN_PUSH_BYTES,
    ),
    plain(
        Kernel::Mamba2Norm,
        "mamba2_norm",
        spv!("mamba2_norm"),
        3,
        MAMBA2_NORM_PUSH_BYTES,
    ),
    plain(
        Kernel::ShortConvRows,
        "shortconv_rows",
        spv!("shortconv_rows"),
        5,
        SHORTCONV_ROWS_PUSH_BYTES,
    ),
    mmt(Kernel::MmtF32, "mmt_f32", spv!("mmt_f32")),
    mmt(Kernel::MmtF16, "mmt_f16", spv!("mmt_f16")),
    mmt(Kernel::MmtBF16, "mmt_bf16", spv!("mmt_bf16")),
    mmt(Kernel::MmtQ4_0, "mmt_q4_0", spv!("mmt_q4_0")),
    mmt(Kernel::MmtQ4_1, "mmt_q4_1", spv!("mmt_q4_1")),
    mmt(Kernel::MmtQ5_0, "mmt_q5_0", spv!("mmt_q5_0")),
    mmt(Kernel::MmtQ5_1, "mmt_q5_1", spv!("mmt_q5_1")),
    mmt(Kernel::MmtQ8_0, "mmt_q8_0", spv!("mmt_q8_0")),
    mmt(Kernel::MmtQ4K, "mmt_q4_k", spv!("mmt_q4_k")),
    mmt(Kernel::MmtQ5K, "mmt_q5_k", spv!("mmt_q5_k")),
    mmt(Kernel::MmtQ6K, "mmt_q6_k", spv!("mmt_q6_k")),
    mmt(Kernel::MmtIQ4XS, "mmt_iq4_xs", spv!("mmt_iq4_xs")),
    KernelDesc {
        invocations: 128,
        // q, k/v and score tiles, per-row max / sum / rescale, the tile's cache rows
        // (attn_flash.comp).
        shared_bytes: (4352 + 2176 + 1024 + 3 * 64 + 32) * 4,
        ..plain(
            Kernel::AttnFlash,
            "attn_flash",
            spv!("attn_flash"),
            7,
            ATTN_FLASH_PUSH_BYTES,
        )
    },
    plain(
        Kernel::RowsAct,
        "rows_act",
        spv!("rows_act"),
        3,
        ROWS_ACT_PUSH_BYTES,
    ),
    KernelDesc {
        invocations: 128,
        ..plain(
            Kernel::MoeRoute,
            "moe_route",
            spv!("moe_route"),
            6,
            MOE_ROUTE_PUSH_BYTES,
        )
    },
    mvx(Kernel::MvxF32, "mvx_f32", spv!("mvx_f32")),
    mvx(Kernel::MvxF16, "mvx_f16", spv!("mvx_f16")),
    mvx(Kernel::MvxBF16, "mvx_bf16", spv!("mvx_bf16")),
    mvx(Kernel::MvxQ4_0, "mvx_q4_0", spv!("mvx_q4_0")),
    mvx(Kernel::MvxQ4_1, "mvx_q4_1", spv!("mvx_q4_1")),
    mvx(Kernel::MvxQ5_0, "mvx_q5_0", spv!("mvx_q5_0")),
    mvx(Kernel::MvxQ5_1, "mvx_q5_1", spv!("mvx_q5_1")),
    mvx(Kernel::MvxQ8_0, "mvx_q8_0", spv!("mvx_q8_0")),
    mvx(Kernel::MvxQ4K, "mvx_q4_k", spv!("mvx_q4_k")),
    mvx(Kernel::MvxQ5K, "mvx_q5_k", spv!("mvx_q5_k")),
    mvx(Kernel::MvxQ6K, "mvx_q6_k", spv!("mvx_q6_k")),
    mvx(Kernel::MvxIQ4XS, "mvx_iq4_xs", spv!("mvx_iq4_xs")),
    glu(mvx(Kernel::MvxgF32, "mvxg_f32", spv!("mvxg_f32"))),
    glu(mvx(Kernel::MvxgF16, "mvxg_f16", spv!("mvxg_f16"))),
    glu(mvx(Kernel::MvxgBF16, "mvxg_bf16", spv!("mvxg_bf16"))),
    glu(mvx(Kernel::MvxgQ4_0, "mvxg_q4_0", spv!("mvxg_q4_0"))),
    glu(mvx(Kernel::MvxgQ4_1, "mvxg_q4_1", spv!("mvxg_q4_1"))),
    glu(mvx(Kernel::MvxgQ5_0, "mvxg_q5_0", spv!("mvxg_q5_0"))),
    glu(mvx(Kernel::MvxgQ5_1, "mvxg_q5_1", spv!("mvxg_q5_1"))),
    glu(mvx(Kernel::MvxgQ8_0, "mvxg_q8_0", spv!("mvxg_q8_0"))),
    glu(mvx(Kernel::MvxgQ4K, "mvxg_q4_k", spv!("mvxg_q4_k"))),
    glu(mvx(Kernel::MvxgQ5K, "mvxg_q5_k", spv!("mvxg_q5_k"))),
    glu(mvx(Kernel::MvxgQ6K, "mvxg_q6_k", spv!("mvxg_q6_k"))),
    glu(mvx(Kernel::MvxgIQ4XS, "mvxg_iq4_xs", spv!("mvxg_iq4_xs"))),
    mvqx(Kernel::MvqxQ4_0, "mvqx_q4_0", spv!("mvqx_q4_0"), true),
    mvqx(Kernel::MvqxQ8_0, "mvqx_q8_0", spv!("mvqx_q8_0"), true),
    mvqx(Kernel::MvqxQ4K, "mvqx_q4_k", spv!("mvqx_q4_k"), true),
    mvqx(Kernel::MvqxQ6K, "mvqx_q6_k", spv!("mvqx_q6_k"), true),
    mvqx(Kernel::MvqxMXFP4, "mvqx_mxfp4", spv!("mvqx_mxfp4"), true),
    glu(mvqx(
        Kernel::MvqxgQ4_0,
        "mvqxg_q4_0",
        spv!("mvqxg_q4_0"),
        true,
    )),
    glu(mvqx(
        Kernel::MvqxgQ8_0,
        "mvqxg_q8_0",
        spv!("mvqxg_q8_0"),
        true,
    )),
    glu(mvqx(
        Kernel::MvqxgQ4K,
        "mvqxg_q4_k",
        spv!("mvqxg_q4_k"),
        true,
    )),
    glu(mvqx(
        Kernel::MvqxgQ6K,
        "mvqxg_q6_k",
        spv!("mvqxg_q6_k"),
        true,
    )),
    glu(mvqx(
        Kernel::MvqxgMXFP4,
        "mvqxg_mxfp4",
        spv!("mvqxg_mxfp4"),
        true,
    )),
    mvqx(Kernel::MvqxeQ4_0, "mvqxe_q4_0", spv!("mvqxe_q4_0"), false),
    mvqx(Kernel::MvqxeQ8_0, "mvqxe_q8_0", spv!("mvqxe_q8_0"), false),
    mvqx(Kernel::MvqxeQ4K, "mvqxe_q4_k", spv!("mvqxe_q4_k"), false),
    mvqx(Kernel::MvqxeQ6K, "mvqxe_q6_k", spv!("mvqxe_q6_k"), false),
    mvqx(
        Kernel::MvqxeMXFP4,
        "mvqxe_mxfp4",
        spv!("mvqxe_mxfp4"),
        false,
    ),
    glu(mvqx(
        Kernel::MvqxgeQ4_0,
        "mvqxge_q4_0",
        spv!("mvqxge_q4_0"),
        false,
    )),
    glu(mvqx(
        Kernel::MvqxgeQ8_0,
        "mvqxge_q8_0",
        spv!("mvqxge_q8_0"),
        false,
    )),
    glu(mvqx(
        Kernel::MvqxgeQ4K,
        "mvqxge_q4_k",
        spv!("mvqxge_q4_k"),
        false,
    )),
    glu(mvqx(
        Kernel::MvqxgeQ6K,
        "mvqxge_q6_k",
        spv!("mvqxge_q6_k"),
        false,
    )),
    glu(mvqx(
        Kernel::MvqxgeMXFP4,
        "mvqxge_mxfp4",
        spv!("mvqxge_mxfp4"),
        false,
    )),
    KernelDesc {
        // As attn_decode's (attn_batch.comp is attn_decode.comp per column: heads of
        // up to 512, the v norm's factor).
        shared_bytes: (2048 + 512 + 1024 + 4224 + 32 + 1 + 256 + 9) * 4,
        ..plain(
            Kernel::AttnBatch,
            "attn_batch",
            spv!("attn_batch"),
            14,
            ATTN_BATCH_PUSH_BYTES,
        )
    },
    mvqn(Kernel::MvqnQ4_0, "mvqn_q4_0", spv!("mvqn_q4_0"), true),
    mvqn(Kernel::MvqnQ8_0, "mvqn_q8_0", spv!("mvqn_q8_0"), true),
    mvqn(Kernel::MvqnQ4K, "mvqn_q4_k", spv!("mvqn_q4_k"), true),
    mvqn(Kernel::MvqnQ6K, "mvqn_q6_k", spv!("mvqn_q6_k"), true),
    mvqn(Kernel::MvqneQ4_0, "mvqne_q4_0", spv!("mvqne_q4_0"), false),
    mvqn(Kernel::MvqneQ8_0, "mvqne_q8_0", spv!("mvqne_q8_0"), false),
    mvqn(Kernel::MvqneQ4K, "mvqne_q4_k", spv!("mvqne_q4_k"), false),
    mvqn(Kernel::MvqneQ6K, "mvqne_q6_k", spv!("mvqne_q6_k"), false),
    plain(
        Kernel::QuantRows,
        "quant_rows",
        spv!("quant_rows"),
        6,
        QUANT_ROWS_PUSH_BYTES,
    ),
    plain(
        Kernel::RowsExt,
        "rows_ext",
        spv!("rows_ext"),
        3,
        ROWS_EXT_PUSH_BYTES,
    ),
    plain(
        Kernel::PleIn,
        "ple_in",
        spv!("ple_in"),
        4,
        PLE_IN_PUSH_BYTES,
    ),
    mvqm(Kernel::MvqmQ4_0, "mvqm_q4_0", spv!("mvqm_q4_0"), true),
    mvqm(Kernel::MvqmQ8_0, "mvqm_q8_0", spv!("mvqm_q8_0"), true),
    mvqm(Kernel::MvqmQ4K, "mvqm_q4_k", spv!("mvqm_q4_k"), true),
    mvqm(Kernel::MvqmQ6K, "mvqm_q6_k", spv!("mvqm_q6_k"), true),
    mvqm(Kernel::MvqmeQ4_0, "mvqme_q4_0", spv!("mvqme_q4_0"), false),
    mvqm(Kernel::MvqmeQ8_0, "mvqme_q8_0", spv!("mvqme_q8_0"), false),
    mvqm(Kernel::MvqmeQ4K, "mvqme_q4_k", spv!("mvqme_q4_k"), false),
    mvqm(Kernel::MvqmeQ6K, "mvqme_q6_k", spv!("mvqme_q6_k"), false),
    mvr(Kernel::MvrF32, "mvr_f32", spv!("mvr_f32")),
    mvr(Kernel::MvrF16, "mvr_f16", spv!("mvr_f16")),
    mvr(Kernel::MvrBF16, "mvr_bf16", spv!("mvr_bf16")),
    mvr(Kernel::MvrQ4_0, "mvr_q4_0", spv!("mvr_q4_0")),
    mvr(Kernel::MvrQ4_1, "mvr_q4_1", spv!("mvr_q4_1")),
    mvr(Kernel::MvrQ5_0, "mvr_q5_0", spv!("mvr_q5_0")),
    mvr(Kernel::MvrQ5_1, "mvr_q5_1", spv!("mvr_q5_1")),
    mvr(Kernel::MvrQ8_0, "mvr_q8_0", spv!("mvr_q8_0")),
    mvr(Kernel::MvrQ4K, "mvr_q4_k", spv!("mvr_q4_k")),
    mvr(Kernel::MvrQ5K, "mvr_q5_k", spv!("mvr_q5_k")),
    mvr(Kernel::MvrQ6K, "mvr_q6_k", spv!("mvr_q6_k")),
    mvr(Kernel::MvrIQ4XS, "mvr_iq4_xs", spv!("mvr_iq4_xs")),
    KernelDesc {
        shared_bytes: ATTN_DEC_SHARED_BYTES,
        ..plain(
            Kernel::AttnDec,
            "attn_dec",
            spv!("attn_dec"),
            14,
            ATTN_DECODE_PUSH_BYTES,
        )
    },
    KernelDesc {
        // attn_dec_batch.comp is attn_dec.comp per column.
        shared_bytes: ATTN_DEC_SHARED_BYTES,
        ..plain(
            Kernel::AttnDecBatch,
            "attn_dec_batch",
            spv!("attn_dec_batch"),
            11,
            ATTN_BATCH_PUSH_BYTES,
        )
    },
    KernelDesc {
        invocations: 128,
        // C|B slice or x tile, L, the state update's B slice, dt / running sum / weights
        // (mamba2_chunk.comp).
        shared_bytes: (2080 + 4160 + 1024 + 3 * 64) * 4,
        ..plain(
            Kernel::Mamba2Chunk,
            "mamba2_chunk",
            spv!("mamba2_chunk"),
            6,
            MAMBA2_CHUNK_PUSH_BYTES,
        )
    },
    KernelDesc {
        // The expert counts and cursors (1,024 each) and the window's token masks.
        invocations: 256,
        shared_bytes: (1024 + 1024 + 2048) * 4,
        ..plain(
            Kernel::MoeGroup,
            "moe_group",
            spv!("moe_group"),
            3,
            MOE_GROUP_PUSH_BYTES,
        )
    },
    mmx(Kernel::MmxF32, "mmx_f32", spv!("mmx_f32")),
    mmx(Kernel::MmxF16, "mmx_f16", spv!("mmx_f16")),
    mmx(Kernel::MmxBF16, "mmx_bf16", spv!("mmx_bf16")),
    mmx(Kernel::MmxQ4_0, "mmx_q4_0", spv!("mmx_q4_0")),
    mmx(Kernel::MmxQ4_1, "mmx_q4_1", spv!("mmx_q4_1")),
    mmx(Kernel::MmxQ5_0, "mmx_q5_0", spv!("mmx_q5_0")),
    mmx(Kernel::MmxQ5_1, "mmx_q5_1", spv!("mmx_q5_1")),
    mmx(Kernel::MmxQ8_0, "mmx_q8_0", spv!("mmx_q8_0")),
    mmx(Kernel::MmxQ4K, "mmx_q4_k", spv!("mmx_q4_k")),
    mmx(Kernel::MmxQ5K, "mmx_q5_k", spv!("mmx_q5_k")),
    mmx(Kernel::MmxQ6K, "mmx_q6_k", spv!("mmx_q6_k")),
    mmx(Kernel::MmxIQ4XS, "mmx_iq4_xs", spv!("mmx_iq4_xs")),
    KernelDesc {
        invocations: 256,
        ..plain(
            Kernel::MoeSum,
            "moe_sum",
            spv!("moe_sum"),
            4,
            MOE_SUM_PUSH_BYTES,
        )
    },
    mmc(Kernel::MmcF32, "mmc_f32", spv_coop!("mmc_f32")),
    mmc(Kernel::MmcF16, "mmc_f16", spv_coop!("mmc_f16")),
    mmc(Kernel::MmcBF16, "mmc_bf16", spv_coop!("mmc_bf16")),
    mmc(Kernel::MmcQ4_0, "mmc_q4_0", spv_coop!("mmc_q4_0")),
    mmc(Kernel::MmcQ4_1, "mmc_q4_1", spv_coop!("mmc_q4_1")),
    mmc(Kernel::MmcQ5_0, "mmc_q5_0", spv_coop!("mmc_q5_0")),
    mmc(Kernel::MmcQ5_1, "mmc_q5_1", spv_coop!("mmc_q5_1")),
    mmc(Kernel::MmcQ8_0, "mmc_q8_0", spv_coop!("mmc_q8_0")),
    mmc(Kernel::MmcQ4K, "mmc_q4_k", spv_coop!("mmc_q4_k")),
    mmc(Kernel::MmcQ5K, "mmc_q5_k", spv_coop!("mmc_q5_k")),
    mmc(Kernel::MmcQ6K, "mmc_q6_k", spv_coop!("mmc_q6_k")),
    mmc(Kernel::MmcIQ4XS, "mmc_iq4_xs", spv_coop!("mmc_iq4_xs")),
    plain(
        Kernel::Argmax,
        "argmax",
        spv!("argmax"),
        4,
        ARGMAX_PUSH_BYTES,
    ),
    mvqm(Kernel::Mvqm8Q4_0, "mvqm8_q4_0", spv!("mvqm8_q4_0"), true),
    mvqm(Kernel::Mvqm8Q8_0, "mvqm8_q8_0", spv!("mvqm8_q8_0"), true),
    mvqm(Kernel::Mvqm8Q4K, "mvqm8_q4_k", spv!("mvqm8_q4_k"), true),
    mvqm(Kernel::Mvqm8Q6K, "mvqm8_q6_k", spv!("mvqm8_q6_k"), true),
    mvqm(
        Kernel::Mvqm8eQ4_0,
        "mvqm8e_q4_0",
        spv!("mvqm8e_q4_0"),
        false,
    ),
    mvqm(
        Kernel::Mvqm8eQ8_0,
        "mvqm8e_q8_0",
        spv!("mvqm8e_q8_0"),
        false,
    ),
    mvqm(Kernel::Mvqm8eQ4K, "mvqm8e_q4_k", spv!("mvqm8e_q4_k"), false),
    mvqm(Kernel::Mvqm8eQ6K, "mvqm8e_q6_k", spv!("mvqm8e_q6_k"), false),
    // The block-tail twins of the mvq* kernels above (same SPIR-V, MV_BLK on).
    blk(mvq(Kernel::MvqbQ4_0, "mvqb_q4_0", spv!("mvq_q4_0"), true)),
    blk(mvq(Kernel::MvqbQ8_0, "mvqb_q8_0", spv!("mvq_q8_0"), true)),
    blk(mvq(Kernel::MvqbQ4K, "mvqb_q4_k", spv!("mvq_q4_k"), true)),
    blk(mvq(Kernel::MvqbQ6K, "mvqb_q6_k", spv!("mvq_q6_k"), true)),
    glu(blk(mvq(
        Kernel::MvqbgQ4_0,
        "mvqbg_q4_0",
        spv!("mvqg_q4_0"),
        true,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgQ8_0,
        "mvqbg_q8_0",
        spv!("mvqg_q8_0"),
        true,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgQ4K,
        "mvqbg_q4_k",
        spv!("mvqg_q4_k"),
        true,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgQ6K,
        "mvqbg_q6_k",
        spv!("mvqg_q6_k"),
        true,
    ))),
    blk(mvq(
        Kernel::MvqbeQ4_0,
        "mvqbe_q4_0",
        spv!("mvqe_q4_0"),
        false,
    )),
    blk(mvq(
        Kernel::MvqbeQ8_0,
        "mvqbe_q8_0",
        spv!("mvqe_q8_0"),
        false,
    )),
    blk(mvq(
        Kernel::MvqbeQ4K,
        "mvqbe_q4_k",
        spv!("mvqe_q4_k"),
        false,
    )),
    blk(mvq(
        Kernel::MvqbeQ6K,
        "mvqbe_q6_k",
        spv!("mvqe_q6_k"),
        false,
    )),
    glu(blk(mvq(
        Kernel::MvqbgeQ4_0,
        "mvqbge_q4_0",
        spv!("mvqge_q4_0"),
        false,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgeQ8_0,
        "mvqbge_q8_0",
        spv!("mvqge_q8_0"),
        false,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgeQ4K,
        "mvqbge_q4_k",
        spv!("mvqge_q4_k"),
        false,
    ))),
    glu(blk(mvq(
        Kernel::MvqbgeQ6K,
        "mvqbge_q6_k",
        spv!("mvqge_q6_k"),
        false,
    ))),
    // Their wide twins (32 subgroups, one block per workgroup).
    wide(mvq(Kernel::MvqwQ4_0, "mvqw_q4_0", spv!("mvq_q4_0"), true)),
    wide(mvq(Kernel::MvqwQ8_0, "mvqw_q8_0", spv!("mvq_q8_0"), true)),
    wide(mvq(Kernel::MvqwQ4K, "mvqw_q4_k", spv!("mvq_q4_k"), true)),
    wide(mvq(Kernel::MvqwQ6K, "mvqw_q6_k", spv!("mvq_q6_k"), true)),
    glu(wide(mvq(
        Kernel::MvqwgQ4_0,
        "mvqwg_q4_0",
        spv!("mvqg_q4_0"),
        true,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgQ8_0,
        "mvqwg_q8_0",
        spv!("mvqg_q8_0"),
        true,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgQ4K,
        "mvqwg_q4_k",
        spv!("mvqg_q4_k"),
        true,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgQ6K,
        "mvqwg_q6_k",
        spv!("mvqg_q6_k"),
        true,
    ))),
    wide(mvq(
        Kernel::MvqweQ4_0,
        "mvqwe_q4_0",
        spv!("mvqe_q4_0"),
        false,
    )),
    wide(mvq(
        Kernel::MvqweQ8_0,
        "mvqwe_q8_0",
        spv!("mvqe_q8_0"),
        false,
    )),
    wide(mvq(
        Kernel::MvqweQ4K,
        "mvqwe_q4_k",
        spv!("mvqe_q4_k"),
        false,
    )),
    wide(mvq(
        Kernel::MvqweQ6K,
        "mvqwe_q6_k",
        spv!("mvqe_q6_k"),
        false,
    )),
    glu(wide(mvq(
        Kernel::MvqwgeQ4_0,
        "mvqwge_q4_0",
        spv!("mvqge_q4_0"),
        false,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgeQ8_0,
        "mvqwge_q8_0",
        spv!("mvqge_q8_0"),
        false,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgeQ4K,
        "mvqwge_q4_k",
        spv!("mvqge_q4_k"),
        false,
    ))),
    glu(wide(mvq(
        Kernel::MvqwgeQ6K,
        "mvqwge_q6_k",
        spv!("mvqge_q6_k"),
        false,
    ))),
    plain(
        Kernel::HalfRows,
        "half_rows",
        spv!("half_rows"),
        4,
        HALF_ROWS_PUSH_BYTES,
    ),
    mvc(Kernel::MvcF32, "mvc_f32", spv_coop!("mvc_f32")),
    mvc(Kernel::MvcF16, "mvc_f16", spv_coop!("mvc_f16")),
    mvc(Kernel::MvcBF16, "mvc_bf16", spv_coop!("mvc_bf16")),
    mvc(Kernel::MvcQ4_0, "mvc_q4_0", spv_coop!("mvc_q4_0")),
    mvc(Kernel::MvcQ4_1, "mvc_q4_1", spv_coop!("mvc_q4_1")),
    mvc(Kernel::MvcQ5_0, "mvc_q5_0", spv_coop!("mvc_q5_0")),
    mvc(Kernel::MvcQ5_1, "mvc_q5_1", spv_coop!("mvc_q5_1")),
    mvc(Kernel::MvcQ8_0, "mvc_q8_0", spv_coop!("mvc_q8_0")),
    mvc(Kernel::MvcQ4K, "mvc_q4_k", spv_coop!("mvc_q4_k")),
    mvc(Kernel::MvcQ5K, "mvc_q5_k", spv_coop!("mvc_q5_k")),
    mvc(Kernel::MvcQ6K, "mvc_q6_k", spv_coop!("mvc_q6_k")),
    mvc(Kernel::MvcIQ4XS, "mvc_iq4_xs", spv_coop!("mvc_iq4_xs")),
    fixed16(mvc(Kernel::MvcfF32, "mvcf_f32", spv_coop!("mvcf_f32"))),
    fixed16(mvc(Kernel::MvcfF16, "mvcf_f16", spv_coop!("mvcf_f16"))),
    fixed16(mvc(Kernel::MvcfBF16, "mvcf_bf16", spv_coop!("mvcf_bf16"))),
    fixed16(mvc(Kernel::MvcfQ4_0, "mvcf_q4_0", spv_coop!("mvcf_q4_0"))),
    fixed16(mvc(Kernel::MvcfQ4_1, "mvcf_q4_1", spv_coop!("mvcf_q4_1"))),
    fixed16(mvc(Kernel::MvcfQ5_0, "mvcf_q5_0", spv_coop!("mvcf_q5_0"))),
    fixed16(mvc(Kernel::MvcfQ5_1, "mvcf_q5_1", spv_coop!("mvcf_q5_1"))),
    fixed16(mvc(Kernel::MvcfQ8_0, "mvcf_q8_0", spv_coop!("mvcf_q8_0"))),
    fixed16(mvc(Kernel::MvcfQ4K, "mvcf_q4_k", spv_coop!("mvcf_q4_k"))),
    fixed16(mvc(Kernel::MvcfQ5K, "mvcf_q5_k", spv_coop!("mvcf_q5_k"))),
    fixed16(mvc(Kernel::MvcfQ6K, "mvcf_q6_k", spv_coop!("mvcf_q6_k"))),
    fixed16(mvc(
        Kernel::MvcfIQ4XS,
        "mvcf_iq4_xs",
        spv_coop!("mvcf_iq4_xs"),
    )),
    // dispatch_bench's dependency-chain probe (chain.comp); no model uses it.
    plain(Kernel::Chain, "chain", spv!("chain"), 3, 24),
];

impl Kernel {
    pub fn desc(self) -> &'static KernelDesc {
        &KERNELS[self as usize]
    }

    /// The batched mat-vec kernel (`mm.glsl`) for weights of type `ty`; `glu`: the
    /// variant whose input is a gated activation (`mmg_*`).
    pub fn mm_for(ty: GgmlType, glu: bool) -> Option<Kernel> {
        let k = Kernel::mm_plain(ty)?;
        if !glu {
            return Some(k);
        }
        Some(match k {
            Kernel::MmF32 => Kernel::MmgF32,
            Kernel::MmF16 => Kernel::MmgF16,
            Kernel::MmBF16 => Kernel::MmgBF16,
            Kernel::MmQ4_0 => Kernel::MmgQ4_0,
            Kernel::MmQ4_1 => Kernel::MmgQ4_1,
            Kernel::MmQ5_0 => Kernel::MmgQ5_0,
            Kernel::MmQ5_1 => Kernel::MmgQ5_1,
            Kernel::MmQ8_0 => Kernel::MmgQ8_0,
            Kernel::MmQ4K => Kernel::MmgQ4K,
            Kernel::MmQ5K => Kernel::MmgQ5K,
            Kernel::MmQ6K => Kernel::MmgQ6K,
            _ => Kernel::MmgIQ4XS,
        })
    }

    /// The tiled prefill matmul (`mmt.glsl`) for weights of type `ty` (the GLU input is
    /// a flag of the kernel).
    pub fn mmt_for(ty: GgmlType) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        Some(KERNELS[Kernel::MmtF32 as usize + i].kernel)
    }

    /// The tiled prefill matmul on cooperative matrices (`mmc.glsl`) for weights of
    /// type `ty`.
    pub fn mmc_for(ty: GgmlType) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        Some(KERNELS[Kernel::MmcF32 as usize + i].kernel)
    }

    /// The batched decode mat-vec on cooperative matrices (`mvc_*`) for weights of
    /// type `ty`.
    /// `fixed`: the 16 x 16 x 16, 32-lane build (`mvcf_*`).
    pub fn mvc_for(ty: GgmlType, fixed: bool) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        let first = if fixed {
            Kernel::MvcfF32
        } else {
            Kernel::MvcF32
        };
        Some(KERNELS[first as usize + i].kernel)
    }

    /// The grouped expert matmul (`mmx_*`) for weights of type `ty`.
    pub fn mmx_for(ty: GgmlType) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        Some(KERNELS[Kernel::MmxF32 as usize + i].kernel)
    }

    /// Whether this device can run `self`: its fixed workgroup size and shared memory
    /// fit the device's limits.
    pub fn fits(self, info: &crate::device::DeviceInfo) -> bool {
        let d = self.desc();
        let inv = d.invocations;
        (inv == 0
            || (inv <= info.max_compute_work_group_invocations
                && inv <= info.max_compute_work_group_size[0]))
            && d.shared_bytes <= info.max_compute_shared_memory_size
    }

    /// The decode mat-vec kernel (`mv.glsl`) for weights of type `ty`; `glu`: the
    /// gate|up variant whose output is the gated activation (`mvg_*`).
    pub fn mv_for(ty: GgmlType, glu: bool) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        let base = if glu { Kernel::MvgF32 } else { Kernel::MvF32 } as usize;
        Some(KERNELS[base + i].kernel)
    }

    /// The MoE router mat-vec whose last workgroup routes the token (`mvr_*`, `mv.glsl`
    /// with `MV_ROUTE`) for weights of type `ty`.
    pub fn mvr_for(ty: GgmlType) -> Option<Kernel> {
        let i = Kernel::mm_plain(ty)? as usize - Kernel::MmF32 as usize;
        Some(KERNELS[Kernel::MvrF32 as usize + i].kernel)
    }

    /// Whether the decode mat-vec of `ty` has a lane-split fast path (others decode
    /// 32-element groups through `deq.glsl`).
    pub fn mv_is_fast(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K
        )
    }

    /// The decode mat-vec on int8 activations (`mvq.glsl`) for weights of type `ty`,
    /// if there is one; `glu`: the gate|up variant; `dot`: with int8 dot-product
    /// instructions (else emulated).
    pub fn mvq_for(ty: GgmlType, glu: bool, dot: bool) -> Option<Kernel> {
        let i = match ty {
            GgmlType::Q4_0 => 0,
            GgmlType::Q8_0 => 1,
            GgmlType::Q4_K => 2,
            GgmlType::Q6_K => 3,
            _ => return None,
        };
        let base = match (glu, dot) {
            (false, true) => Kernel::MvqQ4_0,
            (true, true) => Kernel::MvqgQ4_0,
            (false, false) => Kernel::MvqeQ4_0,
            (true, false) => Kernel::MvqgeQ4_0,
        } as usize;
        Some(KERNELS[base + i].kernel)
    }

    /// The block-tail twin of [`Kernel::mvq_for`] (`MV_BLK`, [`KernelDesc::blk`]); its
    /// wide one ([`KernelDesc::wide`]) with `wide`.
    pub fn mvqb_for(ty: GgmlType, glu: bool, dot: bool, wide: bool) -> Option<Kernel> {
        let k = Kernel::mvq_for(ty, glu, dot)?;
        let base = if dot {
            Kernel::MvqQ4_0
        } else {
            Kernel::MvqeQ4_0
        } as usize;
        // mvq, mvqg (4 each) then mvqe, mvqge: the same order from MvqbQ4_0 on.
        let i = k as usize - base;
        let off = if dot { 0 } else { 8 };
        let first = if wide {
            Kernel::MvqwQ4_0
        } else {
            Kernel::MvqbQ4_0
        };
        Some(KERNELS[first as usize + off + i].kernel)
    }

    /// The batched decode mat-vec on int8 activations (`mvqn.glsl`) of `variant` for
    /// weights of type `ty`; `dot`: the int8-dot variant, else the emulated one.
    pub fn mvqn_for(ty: GgmlType, variant: MvqnVariant, dot: bool) -> Option<Kernel> {
        let i = match ty {
            GgmlType::Q4_0 => 0,
            GgmlType::Q8_0 => 1,
            GgmlType::Q4_K => 2,
            GgmlType::Q6_K => 3,
            _ => return None,
        };
        let base = match (variant, dot) {
            (MvqnVariant::Old, true) => Kernel::MvqnQ4_0,
            (MvqnVariant::Old, false) => Kernel::MvqneQ4_0,
            (MvqnVariant::Grouped, true) => Kernel::MvqmQ4_0,
            (MvqnVariant::Grouped, false) => Kernel::MvqmeQ4_0,
            (MvqnVariant::Grouped8, true) => Kernel::Mvqm8Q4_0,
            (MvqnVariant::Grouped8, false) => Kernel::Mvqm8eQ4_0,
        } as usize;
        Some(KERNELS[base + i].kernel)
    }

    fn mm_plain(ty: GgmlType) -> Option<Kernel> {
        Some(match ty {
            GgmlType::F32 => Kernel::MmF32,
            GgmlType::F16 => Kernel::MmF16,
            GgmlType::BF16 => Kernel::MmBF16,
            GgmlType::Q4_0 => Kernel::MmQ4_0,
            GgmlType::Q4_1 => Kernel::MmQ4_1,
            GgmlType::Q5_0 => Kernel::MmQ5_0,
            GgmlType::Q5_1 => Kernel::MmQ5_1,
            GgmlType::Q8_0 => Kernel::MmQ8_0,
            GgmlType::Q4_K => Kernel::MmQ4K,
            GgmlType::Q5_K => Kernel::MmQ5K,
            GgmlType::Q6_K => Kernel::MmQ6K,
            GgmlType::IQ4_XS => Kernel::MmIQ4XS,
            _ => return None,
        })
    }
}

/// The kernels of the batched decode mat-vec on int8 activations (`mvqn.glsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MvqnVariant {
    /// `mvqn_*`: a workgroup per 4 rows for all 16 columns, one reduction per column.
    Old,
    /// `mvqm_*`: 4 rows x 8 columns per workgroup, one reduction pass.
    Grouped,
    /// `mvqm8_*`: 8 rows x 8 columns per workgroup.
    Grouped8,
}

impl MvqnVariant {
    /// Weight rows per workgroup (`NRB`).
    pub fn rows(self) -> u64 {
        match self {
            MvqnVariant::Grouped8 => 8,
            _ => 4,
        }
    }

    /// Whether a workgroup takes a group of 8 columns (`MVQN_GROUPED`).
    pub fn grouped(self) -> bool {
        self != MvqnVariant::Old
    }
}

impl Tuning {
    /// The batched decode mat-vec kernels these settings pick.
    pub fn mvqn_variant(&self) -> MvqnVariant {
        if self.mvqn_old {
            MvqnVariant::Old
        } else if self.mvqm_rows == 8 {
            MvqnVariant::Grouped8
        } else {
            MvqnVariant::Grouped
        }
    }

    /// (workgroup size, outputs per workgroup) of the decode mat-vecs, gate|up or plain.
    pub fn mv_shape(&self, glu: bool) -> (u32, u32) {
        if glu {
            (self.mvg_workgroup_size, self.mvg_rows)
        } else {
            (self.mv_workgroup_size, self.mv_rows)
        }
    }

    /// Whether the int8-activation decode mat-vecs (gate|up ones with `glu`) run the
    /// subgroup-per-output layout (`mvq.glsl`'s `MV_SG`, specialization constant 3).
    pub fn mvq_subgroup(&self, glu: bool) -> bool {
        if glu {
            self.mvg_subgroup_rows
        } else {
            self.mv_subgroup_rows
        }
    }

    /// (workgroup size, outputs per workgroup) of the int8-activation decode mat-vecs
    /// (`mvq.glsl`): [`Tuning::mv_shape`], or the subgroup-per-output shape where that
    /// layout is on for them.
    pub fn mvq_shape(&self, glu: bool) -> (u32, u32) {
        if self.mvq_subgroup(glu) {
            (self.sg_workgroup_size, self.sg_rows)
        } else {
            self.mv_shape(glu)
        }
    }

    /// (workgroup size, outputs per workgroup) of the block-tail int8 mat-vecs, wide
    /// ([`KernelDesc::wide`]) or not.
    pub fn mvqb_shape(&self, wide: bool) -> (u32, u32) {
        if wide {
            (self.mvw_workgroup_size, 32)
        } else {
            (self.mvb_workgroup_size, self.mv_block)
        }
    }

    /// Whether a block-tail mat-vec of `outs` outputs runs wide ([`Tuning::mv_wide`]):
    /// always with 2; with 1 where its `outs / 32` workgroups (one per compute unit at
    /// a time, as 1,024 invocations are) fill at least 85% of the last wave (on the
    /// H100, qwen3 8b's 4,096 outputs: 128 workgroups on 132 SMs, yes; 32b's 5,120: 160,
    /// no).
    pub fn wide_fits(&self, outs: u64) -> bool {
        match (self.mv_wide, self.compute_units) {
            (0, _) => false,
            (2, _) => true,
            (_, Some(cu)) if cu > 0 => {
                let groups = outs.div_ceil(32);
                let waves = groups.div_ceil(cu as u64);
                groups * 100 >= 85 * waves * cu as u64
            }
            _ => false,
        }
    }

    /// (workgroup size, outputs per workgroup) of the expert mat-vecs (gate|up ones
    /// compute two weight rows per output).
    pub fn mvx_shape(&self) -> (u32, u32) {
        (self.mvx_workgroup_size, self.mvx_rows)
    }

    /// (workgroup size, outputs per workgroup) of the expert mat-vecs on int8
    /// activations: [`Tuning::mvx_shape`], or the subgroup-per-output shape where
    /// [`Tuning::mvx_subgroup`] holds.
    pub fn mvqx_shape(&self) -> (u32, u32) {
        if self.mvx_subgroup {
            (self.mvxs_workgroup_size, self.mvxs_rows)
        } else {
            self.mvx_shape()
        }
    }
}

/// The launch shape chosen once per device (specialization constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Workgroup size (spec constant 0), a power of two.
    pub workgroup_size: u32,
    /// Mat-vec rows per workgroup (spec constant 1).
    pub rows_per_group: u32,
    /// Reduce with subgroup arithmetic (`.sg.spv`) rather than shared memory.
    pub subgroup_reduce: bool,
    /// Decode mat-vec (`mv.glsl`) workgroup size, a power of two >= 16.
    pub mv_workgroup_size: u32,
    /// Decode mat-vec outputs per workgroup (1..=4).
    pub mv_rows: u32,
    /// The same two for the gate|up mat-vecs (`mvg_*`, `mvqg_*`: two weight rows per
    /// output), which prefer smaller workgroups; `CALDERA_VK_MVG_WG` /
    /// `CALDERA_VK_MVG_ROWS`.
    pub mvg_workgroup_size: u32,
    pub mvg_rows: u32,
    /// The same two for the expert mat-vecs (`mvx*`, `mvqx*`), which launch a workgroup
    /// per (slot, row group): more rows per workgroup means fewer, fuller workgroups;
    /// `CALDERA_VK_MVX_WG` / `CALDERA_VK_MVX_ROWS`.
    pub mvx_workgroup_size: u32,
    pub mvx_rows: u32,
    /// The expert mat-vecs on int8 activations run a subgroup per output
    /// (`mvq_expert.glsl`'s `MV_SG`) with per-workgroup block tails, in workgroups of
    /// `mvxs_workgroup_size` invocations and `mvxs_rows` outputs (a power of two up to
    /// 32).
    pub mvx_subgroup: bool,
    pub mvxs_workgroup_size: u32,
    pub mvxs_rows: u32,
    /// Int8 dot-product instructions are used (the device has them and they are not
    /// switched off with `CALDERA_VK_NO_DOT=1`).
    pub int8_dot: bool,
    /// Decode mat-vecs read int8-quantized activations where the weight type allows
    /// (`CALDERA_VK_NO_Q8=1` keeps them in f32).
    pub q8_acts: bool,
    /// Subgroup size requested through subgroup size control, if any.
    pub required_subgroup_size: Option<u32>,
    /// Prefill mat-vecs over more than one token run the tiled matmul (`mmt.glsl`): the
    /// device fits it and `CALDERA_VK_NO_MMT=1` does not switch it off.
    pub tiled_mm: bool,
    /// The tiled matmul runs on cooperative matrices (`mmc.glsl`) with this layout: the
    /// device has a usable shape ([`coop_layout`]) and `CALDERA_VK_NO_COOPMAT=1` /
    /// [`crate::ContextOptions::force_no_coopmat`] does not switch it off. The `mmc_*`
    /// pipelines exist only then.
    pub coopmat_mm: Option<CoopLayout>,
    /// Batched decode steps run their mat-vecs on cooperative matrices (`mvc.glsl`,
    /// with `half_rows`), in subgroups of at least this many lanes (constant 13): the
    /// device has a [`Tuning::coopmat_mm`] shape that tiles `mvc.glsl`'s 32 x 16 x 64
    /// round, room for its tiles in shared memory, and `CALDERA_VK_NO_MVC=1` does not
    /// switch it off.
    pub mvc: Option<u32>,
    /// Subgroups per `mvc.glsl` workgroup (k is split among them): 8, or
    /// `CALDERA_VK_MVC_NSG` (1-16).
    pub mvc_subgroups: u32,
    /// Run the `mvcf_*` build (shape and subgroup size compile-time constants) where the
    /// device's shape is 16 x 16 x 16 in subgroups of 32, unless `CALDERA_VK_MVC_FIXED=0`.
    pub mvc_fixed: bool,
    /// Prefill attention runs `attn_flash` (else `attention`): the device fits it and
    /// `CALDERA_VK_NO_FLASH=1` does not switch it off.
    pub flash_attn: bool,
    /// What the KV cache holds (f16 by default; [`crate::ContextOptions::kv_type`]);
    /// specialization constant 2 of the kernels that touch it.
    pub kv: crate::KvType,
    /// The int8-activation decode mat-vecs (`mvq.glsl`) give each output a subgroup
    /// (specialization constant 3) rather than the workgroup ROWS outputs at once.
    pub mv_subgroup_rows: bool,
    /// The same for the gate|up mat-vecs (`CALDERA_VK_MVG_SG`, else as the others).
    pub mvg_subgroup_rows: bool,
    /// The launch shape of that layout: a workgroup of 4 subgroups and 4 outputs
    /// (`CALDERA_VK_MVQ_WG` / `CALDERA_VK_MVQ_ROWS`).
    pub sg_workgroup_size: u32,
    pub sg_rows: u32,
    /// Batched decode mat-vecs run the old `mvqn_*` kernels (all 16 columns per
    /// workgroup, one reduction per column) instead of `mvqm_*` (`CALDERA_VK_MVQN_OLD=1`,
    /// [`crate::ContextOptions::force_old_mvqn`]); `mvqm_*` also needs a workgroup of at
    /// most 128 (its reduction's shared memory), else the old kernels run.
    pub mvqn_old: bool,
    /// Weight rows per workgroup of `mvqm_*`: 4, or 8 (`mvqm8_*`,
    /// `CALDERA_VK_MVQM_ROWS=8`, [`crate::ContextOptions::mvqm_rows`]).
    pub mvqm_rows: u32,
    /// Mamba2 prefill runs the chunked `mamba2_chunk` (else the token-by-token
    /// `mamba2_scan`): the device fits it and `CALDERA_VK_MAMBA2_SCAN=1` /
    /// [`crate::ContextOptions::force_mamba2_scan`] does not switch it off.
    pub mamba2_chunk: bool,
    /// Weight blocks per lane and step of the subgroup-per-output int8 mat-vecs (spec
    /// constant 11, `mvq.glsl`'s `MV_UNR`): all their loads are issued before their
    /// arithmetic. 1 by default; `CALDERA_VK_MV_UNROLL` (1-8) for tuning.
    pub mv_unroll: u32,
    /// Subgroups (and outputs, one each) per workgroup of the block-tail int8 mat-vecs
    /// ([`KernelDesc::blk`]: the next input's quantization counted per workgroup, or
    /// done inside it at 32), a power of two up to 32, or 0 where they are off (the
    /// subgroup-per-output layout is off, or `CALDERA_VK_MV_BLOCK=0`);
    /// `CALDERA_VK_MV_BLOCK=N`.
    pub mv_block: u32,
    /// Their workgroup size: `mv_block` subgroups.
    pub mvb_workgroup_size: u32,
    /// When the wide block-tail mat-vecs run (32 subgroups, one output each, a
    /// workgroup per block of 32 outputs quantizing it itself: no atomic): 0 never, 1
    /// where their workgroups fill the device's compute units in whole waves
    /// ([`Tuning::wide_fits`]), 2 always. `CALDERA_VK_MV_WIDE`, default 1.
    pub mv_wide: u32,
    /// Their workgroup size (32 subgroups).
    pub mvw_workgroup_size: u32,
    /// [`DeviceInfo::compute_units`](crate::DeviceInfo::compute_units).
    pub compute_units: Option<u32>,
}

/// How `mmc.glsl` tiles its 128 x 64 output with the device's cooperative matrices
/// (specialization constants 4-8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoopLayout {
    /// The multiply's shape: A is m x k (weights), B k x n (tokens), f16 * f16 + f32.
    pub m: u32,
    pub n: u32,
    pub k: u32,
    /// Accumulators per subgroup along the rows and the tokens (`wm * wn` is 4 or 8).
    pub wm: u32,
    pub wn: u32,
    /// Load the next round's weights and inputs before this round's products (constant
    /// 9; on unless `CALDERA_VK_COOPMAT_PREFETCH=0`), else after them.
    pub prefetch: bool,
    /// Stage two 32-element steps per round (constant 10): half the rounds, where the
    /// device has [`MMC_DUAL_SHARED_BYTES`] of shared memory and
    /// `CALDERA_VK_COOPMAT_DUAL=0` does not switch it off.
    pub dual: bool,
}

/// Shared memory of `mmc.glsl` with two steps per round ([`CoopLayout::dual`]): f16 A
/// and B tiles of 72-element rows, the epilogue's staging, the norm's sums and scales.
pub const MMC_DUAL_SHARED_BYTES: u32 = 128 * 72 * 2 + 64 * 72 * 2 + 8192 + 1024 + 256;

/// The `mmc.glsl` layout for `info`'s device, or `None` where it cannot run: no
/// subgroup-scope f16 * f16 + f32 -> f32 shape dividing the 128 x 64 x 32 tile, no f16
/// arithmetic, Vulkan memory model or Vulkan 1.3, too little shared memory, or more
/// accumulator blocks than the fewest subgroups a workgroup of 256 may have
/// (`required_sg`, else the largest subgroup size). Prefers all subgroups busy, then
/// the largest shape, then fewer accumulators per subgroup. `prefetch` and `dual` are
/// off (the context sets them).
pub fn coop_layout(info: &crate::DeviceInfo, required_sg: Option<u32>) -> Option<CoopLayout> {
    if !info.coopmat
        || !info.fp16
        || !info.vulkan_memory_model
        // The SPIR-V is 1.6: Vulkan 1.3 on both the device and the instance, which is
        // when the 1.3 features are read (subgroupSizeControl is one 1.3 requires).
        || info.api_version < ash::vk::API_VERSION_1_3
        || !info.subgroup_size_control
        || !Kernel::MmcF32.fits(info)
    {
        return None;
    }
    let nsg = 256 / required_sg.unwrap_or(info.subgroup_max).max(1);
    pick_coop_layout(&info.coopmat_shapes, nsg)
}

/// [`coop_layout`]'s choice among `shapes` for workgroups of at least `nsg` subgroups.
fn pick_coop_layout(shapes: &[crate::device::CoopShape], nsg: u32) -> Option<CoopLayout> {
    use crate::device::CoopType::{F16, F32};
    let mut best: Option<((u32, u32, i32), CoopLayout)> = None;
    for s in shapes {
        if (s.a, s.b, s.c, s.result) != (F16, F16, F32, F32)
            || ![s.m, s.n, s.k].iter().all(|v| v.is_power_of_two())
            || s.k > MMT_K_STEP as u32
        {
            continue;
        }
        for (wm, wn) in [(2, 2), (1, 4), (4, 1), (2, 4), (4, 2)] {
            let (tm, tn) = (s.m * wm, s.n * wn);
            if tm > MMT_ROWS as u32 || tn > MMT_TOKENS as u32 {
                continue;
            }
            let blocks = (MMT_ROWS as u32 / tm) * (MMT_TOKENS as u32 / tn);
            if blocks > nsg {
                continue;
            }
            let score = (blocks, s.m * s.n * s.k, -((wm * wn) as i32));
            if best.is_none_or(|(b, _)| score > b) {
                let l = CoopLayout {
                    m: s.m,
                    n: s.n,
                    k: s.k,
                    wm,
                    wn,
                    prefetch: false,
                    dual: false,
                };
                best = Some((score, l));
            }
        }
    }
    best.map(|(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{CoopShape, CoopType};

    fn f16_shape(m: u32, n: u32, k: u32) -> CoopShape {
        CoopShape {
            m,
            n,
            k,
            a: CoopType::F16,
            b: CoopType::F16,
            c: CoopType::F32,
            result: CoopType::F32,
        }
    }

    fn layout(m: u32, n: u32, k: u32, wm: u32, wn: u32) -> Option<CoopLayout> {
        Some(CoopLayout {
            m,
            n,
            k,
            wm,
            wn,
            prefetch: false,
            dual: false,
        })
    }

    /// Every subgroup of the workgroup owns a block where the shapes allow; the largest
    /// shape wins; blocks never outnumber the subgroups; f16 accumulators don't count.
    #[test]
    fn coop_layouts() {
        // NVIDIA (subgroup 32: 8 subgroups).
        let nv = [
            f16_shape(16, 8, 16),
            f16_shape(16, 8, 8),
            f16_shape(16, 16, 16),
        ];
        assert_eq!(pick_coop_layout(&nv, 8), layout(16, 16, 16, 2, 2));
        assert_eq!(pick_coop_layout(&nv[..1], 8), layout(16, 8, 16, 2, 4));
        // lavapipe (subgroup 8: 32 subgroups), Intel (16: 16 subgroups).
        assert_eq!(
            pick_coop_layout(&[f16_shape(8, 8, 8)], 32),
            layout(8, 8, 8, 2, 2)
        );
        assert_eq!(
            pick_coop_layout(&[f16_shape(8, 16, 16)], 16),
            layout(8, 16, 16, 2, 2)
        );
        // 8x8 tiles over 8 subgroups would need 16 accumulators each.
        assert_eq!(pick_coop_layout(&[f16_shape(8, 8, 8)], 8), None);
        let mut f16acc = f16_shape(16, 16, 16);
        f16acc.c = CoopType::F16;
        f16acc.result = CoopType::F16;
        assert_eq!(pick_coop_layout(&[f16acc], 8), None);
        for l in [
            pick_coop_layout(&nv, 8),
            pick_coop_layout(&[f16_shape(8, 8, 8)], 32),
        ] {
            let l = l.unwrap();
            // mmc.glsl's staging: blocks x M x N floats within 2048.
            let blocks = (128 / (l.m * l.wm)) * (64 / (l.n * l.wn));
            assert!(blocks * l.m * l.n <= 2048 && l.wm * l.wn <= 8);
        }
    }
}
