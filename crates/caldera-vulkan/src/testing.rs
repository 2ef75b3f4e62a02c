//! Device selection for tests (this crate's and others'): tests run on a Vulkan device
//! when there is one and skip with a message when there is none, unless
//! `CALDERA_REQUIRE_VULKAN=1` (CI), where a missing device fails the test.

use crate::{list_devices, Context, ContextOptions, DeviceInfo, DeviceType, VkError, ENV_DEVICE};

/// Env var: `1` turns "no Vulkan device, skipping" into a test failure.
pub const ENV_REQUIRE: &str = "CALDERA_REQUIRE_VULKAN";

/// The device tests use: `CALDERA_VK_DEVICE=N` if set, else the first CPU-type device
/// (lavapipe), else device 0.
pub fn pick_test_device(devices: &[DeviceInfo]) -> Result<usize, VkError> {
    if let Ok(v) = std::env::var(ENV_DEVICE) {
        let index: usize = v
            .trim()
            .parse()
            .map_err(|_| VkError::Invalid(format!("{ENV_DEVICE}={v:?} is not a device index")))?;
        if index >= devices.len() {
            return Err(VkError::BadDeviceIndex {
                index,
                count: devices.len(),
            });
        }
        return Ok(index);
    }
    if devices.is_empty() {
        return Err(VkError::NoDevice);
    }
    Ok(devices
        .iter()
        .position(|d| d.device_type == DeviceType::Cpu)
        .unwrap_or(0))
}

/// Opens the test device with `opts`, or returns `None` after printing why the caller
/// should skip. Panics (fails the test) instead when `CALDERA_REQUIRE_VULKAN=1`, or when
/// a device exists but cannot be opened.
pub fn test_context(test: &str, opts: &ContextOptions) -> Option<Context> {
    let required = std::env::var(ENV_REQUIRE).is_ok_and(|v| v == "1");
    let picked = list_devices().and_then(|d| pick_test_device(&d));
    let index = match picked {
        Ok(i) => i,
        Err(e @ (VkError::NoLoader(_) | VkError::NoDevice)) if !required => {
            eprintln!("skipping {test}: {e}");
            return None;
        }
        Err(e) => panic!("{test}: no Vulkan device ({ENV_REQUIRE}=1): {e}"),
    };
    match Context::with_options(index, opts) {
        Ok(c) => Some(c),
        Err(e) => panic!("{test}: opening Vulkan device {index}: {e}"),
    }
}

/// Env var: `1` turns "no cooperative-matrix matmul on this device, skipping" into a
/// test failure (CI sets it where it runs the tests on a lavapipe that has them).
pub const ENV_REQUIRE_COOPMAT: &str = "CALDERA_REQUIRE_COOPMAT";

/// Opens the test device with `opts` for a test of the cooperative-matrix kernels, or
/// returns `None` after printing why the caller should skip: no device (as
/// [`test_context`]) or a device without them ([`crate::Tuning::coopmat_mm`] unset).
/// Panics instead when `CALDERA_REQUIRE_COOPMAT=1`.
pub fn coopmat_context(test: &str, opts: &ContextOptions) -> Option<Context> {
    let required = std::env::var(ENV_REQUIRE_COOPMAT).is_ok_and(|v| v == "1");
    let opts = ContextOptions {
        force_no_coopmat: false,
        force_no_mvc: false,
        ..opts.clone()
    };
    let Some(ctx) = test_context(test, &opts) else {
        assert!(
            !required,
            "{test}: no Vulkan device ({ENV_REQUIRE_COOPMAT}=1)"
        );
        return None;
    };
    if ctx.tuning().coopmat_mm.is_none() {
        let why = format!(
            "{} has no usable cooperative matrix (coopmat {}, shapes {:?})",
            ctx.info().name,
            ctx.info().coopmat,
            ctx.info()
                .coopmat_shapes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert!(!required, "{test}: {why} ({ENV_REQUIRE_COOPMAT}=1)");
        eprintln!("skipping {test}: {why}");
        return None;
    }
    Some(ctx)
}
