//! `caldera devices`: the Vulkan devices this machine has and what each can do.

use std::process::ExitCode;

use caldera_vulkan::{list_devices, DeviceInfo};

fn bytes(n: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else {
        format!("{n} B")
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// One device as a block of lines (no trailing newline).
pub fn describe(d: &DeviceInfo) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("device {}: {}", d.index, d.name));
    line(format!(
        "  type       {} ({}, vendor 0x{:04x}, device 0x{:04x})",
        d.device_type.name(),
        d.vendor,
        d.vendor_id,
        d.device_id
    ));
    let driver = match (d.driver_name.is_empty(), d.driver_info.is_empty()) {
        (true, _) => "unknown".to_string(),
        (false, true) => d.driver_name.clone(),
        (false, false) => format!("{} ({})", d.driver_name, d.driver_info),
    };
    line(format!(
        "  driver     {driver}, Vulkan {}",
        d.api_version_string()
    ));
    for (i, h) in d.heaps.iter().enumerate() {
        line(format!(
            "  heap {i}     {}{}",
            bytes(h.size),
            if h.device_local { " device-local" } else { "" }
        ));
    }
    line(format!(
        "  subgroup   {} (min {}, max {}); size control {}, full subgroups {}, arithmetic {}",
        d.subgroup_size,
        d.subgroup_min,
        d.subgroup_max,
        yes(d.subgroup_size_control),
        yes(d.compute_full_subgroups),
        yes(d.subgroup_arithmetic)
    ));
    line(format!(
        "  features   fp16 {}, int8 dot {}{}, coopmat {}, 8-bit storage {}, 16-bit storage {}",
        yes(d.fp16),
        yes(d.int8_dot),
        if d.int8_dot_accelerated {
            " (accelerated)"
        } else {
            ""
        },
        yes(d.coopmat),
        yes(d.storage_8bit),
        yes(d.storage_16bit)
    ));
    if !d.coopmat_shapes.is_empty() {
        let shapes: Vec<String> = d.coopmat_shapes.iter().map(|s| s.to_string()).collect();
        line(format!("  coopmat    {}", shapes.join(", ")));
    }
    line(format!(
        "  limits     max allocation {}, max storage buffer range {}, workgroup {} \
         invocations ({}x{}x{}), shared memory {}",
        bytes(d.max_memory_allocation_size),
        bytes(d.max_storage_buffer_range as u64),
        d.max_compute_work_group_invocations,
        d.max_compute_work_group_size[0],
        d.max_compute_work_group_size[1],
        d.max_compute_work_group_size[2],
        bytes(d.max_compute_shared_memory_size as u64)
    ));
    if let Some(cu) = d.compute_units {
        line(format!("  units      {cu} compute units (SMs / CUs)"));
    }
    if d.timestamp_valid_bits > 0 {
        line(format!("  timestamps {} ns per tick", d.timestamp_period));
    } else {
        line("  timestamps none on the compute queue".to_string());
    }
    s.pop();
    s
}

/// Prints one block per Vulkan device. Exit code 1 when the loader sees no device;
/// an error (exit 2) when there is no Vulkan loader at all.
pub fn devices() -> anyhow::Result<ExitCode> {
    let list = list_devices()?;
    if list.is_empty() {
        eprintln!(
            "no Vulkan device found; install your GPU's Vulkan driver (`vulkaninfo --summary` \
             shows what the loader sees), or use the CPU backend"
        );
        return Ok(ExitCode::from(1));
    }
    for (i, d) in list.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{}", describe(d));
    }
    Ok(ExitCode::SUCCESS)
}
