//! The Vulkan instance and what each physical device can do.
//!
//! The loader (`libvulkan.so.1`, `vulkan-1.dll`) is opened at run time, so caldera builds
//! and runs where no Vulkan is installed and answers with [`VkError::NoLoader`].

use std::ffi::{c_char, CStr};
use std::sync::{Arc, Mutex};

use ash::vk;

use crate::error::{Result, VkError, VkResultExt};

/// Env var: `1` enables `VK_LAYER_KHRONOS_validation` when the layer is installed.
pub const ENV_VALIDATION: &str = "CALDERA_VK_VALIDATION";

const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// What kind of device the driver says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    Discrete,
    Integrated,
    Virtual,
    /// A CPU implementation such as lavapipe (Mesa's llvmpipe driver).
    Cpu,
    Other,
}

impl DeviceType {
    fn from_vk(t: vk::PhysicalDeviceType) -> DeviceType {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => DeviceType::Discrete,
            vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceType::Integrated,
            vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceType::Virtual,
            vk::PhysicalDeviceType::CPU => DeviceType::Cpu,
            _ => DeviceType::Other,
        }
    }

    /// Lower-case name: "discrete", "integrated", "virtual", "cpu", "other".
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Discrete => "discrete",
            DeviceType::Integrated => "integrated",
            DeviceType::Virtual => "virtual",
            DeviceType::Cpu => "cpu",
            DeviceType::Other => "other",
        }
    }
}

/// One memory heap of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryHeap {
    pub size: u64,
    pub device_local: bool,
}

/// Everything caldera reads about one physical device to pick kernels and split memory.
///
/// Features are reported as the device exposes them; a feature only counts when both the
/// device and the instance speak the Vulkan version (or extension) that defines it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Position in the loader's enumeration order (what `--device N` names).
    pub index: usize,
    pub name: String,
    pub vendor_id: u32,
    /// Vendor name from the PCI id ("NVIDIA", "AMD", "Intel", "Mesa", ...).
    pub vendor: &'static str,
    pub device_id: u32,
    pub device_type: DeviceType,
    /// Driver name and info (VK_KHR_driver_properties); empty when not reported.
    pub driver_name: String,
    pub driver_info: String,
    /// Packed Vulkan version the device supports (`vk::api_version_*` decode it).
    pub api_version: u32,
    pub driver_version: u32,
    pub heaps: Vec<MemoryHeap>,
    /// Default subgroup size, and the range selectable with subgroup size control.
    pub subgroup_size: u32,
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    /// `subgroupSizeControl` and `computeFullSubgroups` features.
    pub subgroup_size_control: bool,
    pub compute_full_subgroups: bool,
    /// Subgroup arithmetic (subgroupAdd, ...) and shuffles are supported in compute
    /// shaders (the subgroup builds of the kernels use both).
    pub subgroup_arithmetic: bool,
    /// `shaderFloat16` (f16 arithmetic in shaders).
    pub fp16: bool,
    /// `shaderInt8`.
    pub int8: bool,
    /// `shaderIntegerDotProduct` (VK_KHR_shader_integer_dot_product or Vulkan 1.3).
    pub int8_dot: bool,
    /// The 4x8-bit packed signed dot product is hardware-accelerated.
    pub int8_dot_accelerated: bool,
    /// `storageBuffer8BitAccess` / `storageBuffer16BitAccess`.
    pub storage_8bit: bool,
    pub storage_16bit: bool,
    /// `vulkanMemoryModel` (cooperative-matrix kernels are compiled for it).
    pub vulkan_memory_model: bool,
    /// VK_KHR_cooperative_matrix with its `cooperativeMatrix` feature.
    pub coopmat: bool,
    /// The subgroup-scope matrix shapes the device multiplies (empty without `coopmat`).
    pub coopmat_shapes: Vec<CoopShape>,
    pub max_memory_allocation_size: u64,
    pub max_memory_allocation_count: u32,
    pub max_storage_buffer_range: u32,
    pub min_storage_buffer_offset_alignment: u64,
    pub max_compute_work_group_size: [u32; 3],
    pub max_compute_work_group_invocations: u32,
    pub max_compute_work_group_count: [u32; 3],
    pub max_compute_shared_memory_size: u32,
    pub max_push_constants_size: u32,
    /// Nanoseconds per timestamp tick.
    pub timestamp_period: f32,
    /// The queue family caldera uses (the first with compute), if any.
    pub compute_queue_family: Option<u32>,
    /// Valid bits of that family's timestamps (0: no timestamps).
    pub timestamp_valid_bits: u32,
    /// Streaming multiprocessors / compute units, where the driver tells
    /// (VK_NV_shader_sm_builtins, VK_AMD_shader_core_properties); launch-shape choices
    /// that depend on how workgroups fill the device use it.
    pub compute_units: Option<u32>,
}

/// One cooperative-matrix multiply the device supports: D (M x N, `result`) = A (M x K,
/// `a`) * B (K x N, `b`) + C (`c`), subgroup scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a: CoopType,
    pub b: CoopType,
    pub c: CoopType,
    pub result: CoopType,
}

/// Component types of cooperative matrices that caldera can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopType {
    F16,
    F32,
    I8,
    I32,
    Other,
}

impl CoopType {
    fn from_vk(t: vk::ComponentTypeKHR) -> CoopType {
        match t {
            vk::ComponentTypeKHR::FLOAT16 => CoopType::F16,
            vk::ComponentTypeKHR::FLOAT32 => CoopType::F32,
            vk::ComponentTypeKHR::SINT8 => CoopType::I8,
            vk::ComponentTypeKHR::SINT32 => CoopType::I32,
            _ => CoopType::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CoopType::F16 => "f16",
            CoopType::F32 => "f32",
            CoopType::I8 => "i8",
            CoopType::I32 => "i32",
            CoopType::Other => "other",
        }
    }
}

impl std::fmt::Display for CoopShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{} {}*{}+{}->{}",
            self.m,
            self.n,
            self.k,
            self.a.name(),
            self.b.name(),
            self.c.name(),
            self.result.name()
        )
    }
}

impl DeviceInfo {
    /// "1.3.230".
    pub fn api_version_string(&self) -> String {
        let v = self.api_version;
        format!(
            "{}.{}.{}",
            vk::api_version_major(v),
            vk::api_version_minor(v),
            vk::api_version_patch(v)
        )
    }

    /// Total size of the device-local heaps.
    pub fn device_local_bytes(&self) -> u64 {
        self.heaps
            .iter()
            .filter(|h| h.device_local)
            .map(|h| h.size)
            .sum()
    }

    /// The largest range of one storage buffer binding and one allocation that caldera
    /// uses on this device: min(maxStorageBufferRange, maxMemoryAllocationSize), rounded
    /// down to 256 bytes.
    pub fn max_buffer_bytes(&self) -> u64 {
        let m = (self.max_storage_buffer_range as u64).min(self.max_memory_allocation_size);
        m & !255
    }
}

fn vendor_name(id: u32) -> &'static str {
    match id {
        0x10de => "NVIDIA",
        0x1002 | 0x1022 => "AMD",
        0x8086 => "Intel",
        0x13b5 => "ARM",
        0x5143 => "Qualcomm",
        0x1010 => "ImgTec",
        0x106b => "Apple",
        0x10005 => "Mesa",
        _ => "unknown",
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The process-wide instance, created on first use and kept for the life of the process.
static INSTANCE: Mutex<Option<Arc<Instance>>> = Mutex::new(None);

/// The process's one Vulkan instance (created on first call; a failure is retried on
/// the next call). One instance for every context avoids concurrent instance creation
/// and destruction, which crashes some drivers (seen on NVIDIA 580 with parallel tests).
pub(crate) fn instance() -> Result<Arc<Instance>> {
    let mut slot = INSTANCE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = slot.as_ref() {
        return Ok(i.clone());
    }
    let i = Arc::new(Instance::new()?);
    *slot = Some(i.clone());
    Ok(i)
}

/// The loader and one instance; destroyed on drop.
pub(crate) struct Instance {
    /// Keeps the loader library open while the instance lives.
    entry: ash::Entry,
    pub instance: ash::Instance,
    /// Vulkan version requested at instance creation.
    pub api_version: u32,
}

impl Instance {
    pub fn new() -> Result<Instance> {
        // SAFETY: loading the system loader library runs its initialisers; that is the
        // documented way to use a run-time-loaded Vulkan.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| VkError::NoLoader(e.to_string()))?;
        // SAFETY: plain queries on a valid entry.
        let loader_version = unsafe { entry.try_enumerate_instance_version() }
            .vk("querying the Vulkan loader version")?
            .unwrap_or(vk::API_VERSION_1_0);
        if loader_version < vk::API_VERSION_1_1 {
            return Err(VkError::Unsupported {
                name: "Vulkan loader".into(),
                why: "it supports only Vulkan 1.0; caldera needs 1.1 or newer".into(),
            });
        }
        let api_version = loader_version.min(vk::API_VERSION_1_3);

        let mut layers: Vec<*const c_char> = Vec::new();
        if std::env::var(ENV_VALIDATION).is_ok_and(|v| v == "1") {
            // SAFETY: as above.
            let available = unsafe { entry.enumerate_instance_layer_properties() }
                .vk("listing Vulkan layers")?;
            if available
                .iter()
                .any(|l| l.layer_name_as_c_str().is_ok_and(|n| n == VALIDATION_LAYER))
            {
                layers.push(VALIDATION_LAYER.as_ptr());
            } else {
                eprintln!(
                    "caldera: {ENV_VALIDATION}=1 but VK_LAYER_KHRONOS_validation is not installed \
                     (Debian: vulkan-validationlayers); running without it"
                );
            }
        }

        // SAFETY: as above.
        let exts = unsafe { entry.enumerate_instance_extension_properties(None) }
            .vk("listing Vulkan instance extensions")?;
        let has_ext = |name: &CStr| {
            exts.iter()
                .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == name))
        };
        let mut ext_ptrs: Vec<*const c_char> = Vec::new();
        let mut flags = vk::InstanceCreateFlags::empty();
        if has_ext(ash::khr::portability_enumeration::NAME) {
            ext_ptrs.push(ash::khr::portability_enumeration::NAME.as_ptr());
            flags |= vk::InstanceCreateFlags::ENUMERATE_PORTABILITY_KHR;
        }

        let app = vk::ApplicationInfo::default()
            .application_name(c"caldera")
            .engine_name(c"caldera")
            .api_version(api_version);
        let info = vk::InstanceCreateInfo::default()
            .application_info(&app)
            .enabled_layer_names(&layers)
            .enabled_extension_names(&ext_ptrs)
            .flags(flags);
        // SAFETY: `info` and everything it points to outlive the call.
        let instance = unsafe { entry.create_instance(&info, None) }.map_err(|r| match r {
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => VkError::NoDevice,
            r => VkError::from_vk("creating the Vulkan instance", r),
        })?;
        Ok(Instance {
            entry,
            instance,
            api_version,
        })
    }

    pub fn physical_devices(&self) -> Result<Vec<vk::PhysicalDevice>> {
        // SAFETY: valid instance.
        match unsafe { self.instance.enumerate_physical_devices() } {
            Ok(v) => Ok(v),
            Err(vk::Result::ERROR_INITIALIZATION_FAILED) => Ok(Vec::new()),
            Err(r) => Err(VkError::from_vk("listing Vulkan devices", r)),
        }
    }

    /// Device extensions by name.
    pub fn device_extensions(&self, pd: vk::PhysicalDevice) -> Result<Vec<String>> {
        // SAFETY: `pd` comes from this instance.
        let exts = unsafe { self.instance.enumerate_device_extension_properties(pd) }
            .vk("listing Vulkan device extensions")?;
        Ok(exts
            .iter()
            .filter_map(|e| {
                e.extension_name_as_c_str()
                    .ok()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect())
    }

    /// Reads everything [`DeviceInfo`] holds about `pd`.
    pub fn describe(&self, index: usize, pd: vk::PhysicalDevice) -> Result<DeviceInfo> {
        let inst = &self.instance;
        let exts = self.device_extensions(pd)?;
        let has = |name: &CStr| exts.iter().any(|e| e.as_bytes() == name.to_bytes());
        // SAFETY: `pd` comes from this instance; every chained struct lives to the end.
        let base = unsafe { inst.get_physical_device_properties(pd) };
        let api = base.api_version.min(self.api_version);
        let v12 = api >= vk::API_VERSION_1_2;
        let v13 = api >= vk::API_VERSION_1_3;

        let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
        let mut maint3 = vk::PhysicalDeviceMaintenance3Properties::default();
        let mut driver = vk::PhysicalDeviceDriverProperties::default();
        let mut sg_ctl = vk::PhysicalDeviceSubgroupSizeControlProperties::default();
        let mut dot = vk::PhysicalDeviceShaderIntegerDotProductProperties::default();
        let has_dot_ext = has(ash::khr::shader_integer_dot_product::NAME);
        let has_sgc_ext = has(ash::ext::subgroup_size_control::NAME);
        let has_driver_ext = has(ash::khr::driver_properties::NAME);
        let mut sm = vk::PhysicalDeviceShaderSMBuiltinsPropertiesNV::default();
        let mut amd = vk::PhysicalDeviceShaderCorePropertiesAMD::default();
        let has_sm_ext = has(ash::nv::shader_sm_builtins::NAME);
        let has_amd_ext = has(ash::amd::shader_core_properties::NAME);
        {
            let mut props = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut subgroup)
                .push_next(&mut maint3);
            if v12 || has_driver_ext {
                props = props.push_next(&mut driver);
            }
            if v13 || has_sgc_ext {
                props = props.push_next(&mut sg_ctl);
            }
            if v13 || has_dot_ext {
                props = props.push_next(&mut dot);
            }
            if has_sm_ext {
                props = props.push_next(&mut sm);
            }
            if has_amd_ext {
                props = props.push_next(&mut amd);
            }
            // SAFETY: see above.
            unsafe { inst.get_physical_device_properties2(pd, &mut props) };
        }

        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut coop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let has_coop_ext = has(ash::khr::cooperative_matrix::NAME);
        {
            let mut feats = vk::PhysicalDeviceFeatures2::default();
            if v12 {
                feats = feats.push_next(&mut f11).push_next(&mut f12);
            }
            if v13 {
                feats = feats.push_next(&mut f13);
            }
            if has_coop_ext {
                feats = feats.push_next(&mut coop);
            }
            // SAFETY: see above.
            unsafe { inst.get_physical_device_features2(pd, &mut feats) };
        }

        // SAFETY: see above.
        let mem = unsafe { inst.get_physical_device_memory_properties(pd) };
        let heaps = mem
            .memory_heaps_as_slice()
            .iter()
            .map(|h| MemoryHeap {
                size: h.size,
                device_local: h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
            })
            .collect();

        // SAFETY: see above.
        let families = unsafe { inst.get_physical_device_queue_family_properties(pd) };
        let compute = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE));

        let l = &base.limits;
        let sg_size = subgroup.subgroup_size.max(1);
        let (sg_min, sg_max) = if sg_ctl.min_subgroup_size > 0 {
            (sg_ctl.min_subgroup_size, sg_ctl.max_subgroup_size)
        } else {
            (sg_size, sg_size)
        };
        let on = |b: vk::Bool32| b == vk::TRUE;
        let coopmat = has_coop_ext && on(coop.cooperative_matrix);
        let coopmat_shapes = if coopmat {
            let ext = ash::khr::cooperative_matrix::Instance::new(&self.entry, inst);
            // SAFETY: `pd` comes from this instance, which has the extension's functions.
            let props = unsafe { ext.get_physical_device_cooperative_matrix_properties(pd) }
                .unwrap_or_default();
            props
                .iter()
                .filter(|p| p.scope == vk::ScopeKHR::SUBGROUP)
                .map(|p| CoopShape {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    a: CoopType::from_vk(p.a_type),
                    b: CoopType::from_vk(p.b_type),
                    c: CoopType::from_vk(p.c_type),
                    result: CoopType::from_vk(p.result_type),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(DeviceInfo {
            index,
            name: c_chars_to_string(&base.device_name),
            vendor_id: base.vendor_id,
            vendor: vendor_name(base.vendor_id),
            device_id: base.device_id,
            device_type: DeviceType::from_vk(base.device_type),
            driver_name: c_chars_to_string(&driver.driver_name),
            driver_info: c_chars_to_string(&driver.driver_info),
            api_version: base.api_version,
            driver_version: base.driver_version,
            heaps,
            subgroup_size: sg_size,
            subgroup_min: sg_min,
            subgroup_max: sg_max,
            subgroup_size_control: on(f13.subgroup_size_control),
            compute_full_subgroups: on(f13.compute_full_subgroups),
            subgroup_arithmetic: subgroup
                .supported_stages
                .contains(vk::ShaderStageFlags::COMPUTE)
                && subgroup.supported_operations.contains(
                    vk::SubgroupFeatureFlags::ARITHMETIC
                        | vk::SubgroupFeatureFlags::BASIC
                        | vk::SubgroupFeatureFlags::SHUFFLE,
                ),
            fp16: on(f12.shader_float16),
            int8: on(f12.shader_int8),
            int8_dot: on(f13.shader_integer_dot_product),
            int8_dot_accelerated: on(dot.integer_dot_product4x8_bit_packed_signed_accelerated),
            storage_8bit: on(f12.storage_buffer8_bit_access),
            storage_16bit: on(f11.storage_buffer16_bit_access),
            vulkan_memory_model: on(f12.vulkan_memory_model),
            coopmat,
            coopmat_shapes,
            max_memory_allocation_size: maint3.max_memory_allocation_size,
            max_memory_allocation_count: l.max_memory_allocation_count,
            max_storage_buffer_range: l.max_storage_buffer_range,
            min_storage_buffer_offset_alignment: l.min_storage_buffer_offset_alignment,
            max_compute_work_group_size: l.max_compute_work_group_size,
            max_compute_work_group_invocations: l.max_compute_work_group_invocations,
            max_compute_work_group_count: l.max_compute_work_group_count,
            max_compute_shared_memory_size: l.max_compute_shared_memory_size,
            max_push_constants_size: l.max_push_constants_size,
            timestamp_period: l.timestamp_period,
            compute_queue_family: compute.map(|i| i as u32),
            timestamp_valid_bits: compute.map_or(0, |i| families[i].timestamp_valid_bits),
            compute_units: if has_sm_ext && sm.shader_sm_count > 0 {
                Some(sm.shader_sm_count)
            } else {
                let cu = amd
                    .shader_engine_count
                    .saturating_mul(amd.shader_arrays_per_engine_count)
                    .saturating_mul(amd.compute_units_per_shader_array);
                (has_amd_ext && cu > 0).then_some(cu)
            },
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every device created from this instance is destroyed before (owners
        // hold the instance longer than their devices).
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// Every Vulkan device the loader reports, in enumeration order.
///
/// Fails with [`VkError::NoLoader`] where no Vulkan loader is installed; an installed
/// loader without drivers gives an empty list.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    let inst = match instance() {
        Ok(i) => i,
        Err(VkError::NoDevice) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    inst.physical_devices()?
        .into_iter()
        .enumerate()
        .map(|(i, pd)| inst.describe(i, pd))
        .collect()
}
