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
    MatVecF16 = 0,
    MatVecQ8_0 = 1,
    MatVecQ4_0 = 2,
    MatVecQ4K = 3,
    MatVecQ6K = 4,
    RmsNorm = 5,
    MmF32 = 6,
    MmF16 = 7,
    MmBF16 = 8,
    MmQ4_0 = 9,
    MmQ4_1 = 10,
    MmQ5_0 = 11,
    MmQ5_1 = 12,
    MmQ8_0 = 13,
    MmQ4K = 14,
    MmQ5K = 15,
    MmQ6K = 16,
    MmIQ4XS = 17,
    RopeKv = 18,
    Attention = 19,
    AddNorm = 20,
    MmgF32 = 21,
    MmgF16 = 22,
    MmgBF16 = 23,
    MmgQ4_0 = 24,
    MmgQ4_1 = 25,
    MmgQ5_0 = 26,
    MmgQ5_1 = 27,
    MmgQ8_0 = 28,
    MmgQ4K = 29,
    MmgQ5K = 30,
    MmgQ6K = 31,
    MmgIQ4XS = 32,
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
}

macro_rules! spv {
    ($name:literal) => {
        (
            include_bytes!(concat!("../shaders/spv/", $name, ".sg.spv")).as_slice(),
            include_bytes!(concat!("../shaders/spv/", $name, ".sh.spv")).as_slice(),
        )
    };
}

const fn matvec(
    kernel: Kernel,
    name: &'static str,
    spv: (&'static [u8], &'static [u8]),
) -> KernelDesc {
    KernelDesc {
        kernel,
        name,
        spirv_subgroup: spv.0,
        spirv_shared: spv.1,
        bindings: 3,
        push_bytes: MATVEC_PUSH_BYTES,
        rows_per_group: true,
    }
}

/// Mat-vec push constants: `k, rows, x_offset, y_offset` (u32 each).
pub const MATVEC_PUSH_BYTES: u32 = 16;
/// RMSNorm push constants: `n: u32, rows: u32, eps: f32`.
pub const RMSNORM_PUSH_BYTES: u32 = 12;

/// Batched mat-vec (`mm.glsl`) push constants: `k, rows, y_offset, ld_x, ld_y, flags`
/// (u32), `eps, cap` (f32).
pub const MM_PUSH_BYTES: u32 = 32;
/// `rope_kv` push constants: `n_heads, n_kv, hd, n_rot, flags, ld_qkv` (u32), `eps` (f32).
pub const ROPE_KV_PUSH_BYTES: u32 = 28;
/// `attention` push constants: `n_heads, n_kv, hd, hpw, n_chunks, window, ld_qkv` (u32),
/// `scale, softcap` (f32).
pub const ATTENTION_PUSH_BYTES: u32 = 36;
/// `add_norm` push constants: `n` (u32), `eps` (f32).
pub const ADD_NORM_PUSH_BYTES: u32 = 8;

const fn mm(kernel: Kernel, name: &'static str, spv: (&'static [u8], &'static [u8])) -> KernelDesc {
    KernelDesc {
        kernel,
        name,
        spirv_subgroup: spv.0,
        spirv_shared: spv.1,
        bindings: 5,
        push_bytes: MM_PUSH_BYTES,
        rows_per_group: true,
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
    }
}

/// The kernel table, indexed by `Kernel as usize`.
pub const KERNELS: [KernelDesc; 33] = [
    matvec(Kernel::MatVecF16, "matvec_f16", spv!("matvec_f16")),
    matvec(Kernel::MatVecQ8_0, "matvec_q8_0", spv!("matvec_q8_0")),
    matvec(Kernel::MatVecQ4_0, "matvec_q4_0", spv!("matvec_q4_0")),
    matvec(Kernel::MatVecQ4K, "matvec_q4_k", spv!("matvec_q4_k")),
    matvec(Kernel::MatVecQ6K, "matvec_q6_k", spv!("matvec_q6_k")),
    KernelDesc {
        kernel: Kernel::RmsNorm,
        name: "rms_norm",
        spirv_subgroup: spv!("rms_norm").0,
        spirv_shared: spv!("rms_norm").1,
        bindings: 3,
        push_bytes: RMSNORM_PUSH_BYTES,
        rows_per_group: false,
    },
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
        7,
        ROPE_KV_PUSH_BYTES,
    ),
    plain(
        Kernel::Attention,
        "attention",
        spv!("attention"),
        5,
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
];

impl Kernel {
    pub fn desc(self) -> &'static KernelDesc {
        &KERNELS[self as usize]
    }

    /// The mat-vec kernel that reads weights of type `ty` straight from their blocks.
    pub fn matvec_for(ty: GgmlType) -> Option<Kernel> {
        match ty {
            GgmlType::F16 => Some(Kernel::MatVecF16),
            GgmlType::Q8_0 => Some(Kernel::MatVecQ8_0),
            GgmlType::Q4_0 => Some(Kernel::MatVecQ4_0),
            GgmlType::Q4_K => Some(Kernel::MatVecQ4K),
            GgmlType::Q6_K => Some(Kernel::MatVecQ6K),
            _ => None,
        }
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

/// The launch shape chosen once per device (specialization constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Workgroup size (spec constant 0), a power of two.
    pub workgroup_size: u32,
    /// Mat-vec rows per workgroup (spec constant 1).
    pub rows_per_group: u32,
    /// Reduce with subgroup arithmetic (`.sg.spv`) rather than shared memory.
    pub subgroup_reduce: bool,
    /// Subgroup size requested through subgroup size control, if any.
    pub required_subgroup_size: Option<u32>,
}
