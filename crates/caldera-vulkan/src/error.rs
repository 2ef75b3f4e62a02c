//! The errors of the Vulkan backend, each with a message a user can act on.

use ash::vk;

/// Everything the Vulkan backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VkError {
    /// The Vulkan loader library could not be opened.
    #[error(
        "no Vulkan loader found ({0}); install the Vulkan loader and your GPU's Vulkan driver \
         (Debian/Ubuntu: `apt-get install libvulkan1 mesa-vulkan-drivers`, which also gives the \
         CPU driver lavapipe), or use the CPU backend"
    )]
    NoLoader(String),
    /// The loader works but reports no physical device (or none usable).
    #[error(
        "no Vulkan device found; check that a Vulkan driver (ICD) for your GPU is installed \
         (`vulkaninfo --summary` lists what the loader sees), or use the CPU backend"
    )]
    NoDevice,
    /// `--device N` / `CALDERA_VK_DEVICE=N` named a device that does not exist.
    #[error("Vulkan device {index} does not exist: {count} device(s) found (`caldera devices` lists them)")]
    BadDeviceIndex { index: usize, count: usize },
    /// The device cannot run our kernels.
    #[error("Vulkan device {name:?} is not usable: {why}")]
    Unsupported { name: String, why: String },
    /// The driver reset or lost the device (hang, crash, removed card).
    #[error(
        "the Vulkan device was lost while {0} (driver reset, GPU hang or card removed); \
         restart caldera, and report it if it happens again"
    )]
    DeviceLost(&'static str),
    /// Device memory ran out.
    #[error(
        "out of device memory while {what} ({bytes} bytes); use a smaller model or quantization, \
         fewer slots or a shorter context, or spread the model over more devices"
    )]
    OutOfDeviceMemory { what: String, bytes: u64 },
    /// Host memory ran out inside the driver.
    #[error("out of host memory in the Vulkan driver while {0}")]
    OutOfHostMemory(&'static str),
    /// No memory type fits the request (a driver we do not handle yet).
    #[error("no Vulkan memory type is {wanted} for {what}")]
    NoMemoryType { what: String, wanted: &'static str },
    /// A caller passed shapes or sizes that do not fit (never a driver failure).
    #[error("invalid Vulkan request: {0}")]
    Invalid(String),
    /// Any other Vulkan result code.
    #[error("Vulkan call failed while {what}: {result:?}")]
    Vk {
        what: &'static str,
        result: vk::Result,
    },
}

impl VkError {
    /// Maps a Vulkan result code into the matching variant.
    pub fn from_vk(what: &'static str, result: vk::Result) -> VkError {
        match result {
            vk::Result::ERROR_DEVICE_LOST => VkError::DeviceLost(what),
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => VkError::OutOfDeviceMemory {
                what: what.to_string(),
                bytes: 0,
            },
            vk::Result::ERROR_OUT_OF_HOST_MEMORY => VkError::OutOfHostMemory(what),
            result => VkError::Vk { what, result },
        }
    }
}

/// The backend's result type.
pub type Result<T, E = VkError> = std::result::Result<T, E>;

/// `.vk("doing X")?` on an ash result.
pub(crate) trait VkResultExt<T> {
    fn vk(self, what: &'static str) -> Result<T>;
}

impl<T> VkResultExt<T> for std::result::Result<T, vk::Result> {
    fn vk(self, what: &'static str) -> Result<T> {
        self.map_err(|r| VkError::from_vk(what, r))
    }
}
