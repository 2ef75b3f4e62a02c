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

/// The kernel table, indexed by `Kernel as usize`.
pub const KERNELS: [KernelDesc; 6] = [
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
