//! glibc malloc tuning. By default glibc serves large blocks with mmap and returns them on free, so every
//! batched forward pass maps, page-faults and unmaps its activations afresh: about 3x slower on CPU. Keeping
//! freed memory in the heap removes that cost (see README's benchmark for the measured effect).

/// Whether to tune malloc; `EDITSERVE_MALLOC=default` keeps glibc's defaults (for measuring the difference).
pub fn tune_from_env() -> bool {
    let tune = std::env::var("EDITSERVE_MALLOC").map_or(true, |v| v != "default");
    if tune {
        tune_malloc();
    }
    tune
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // Values from mallopt(3): never serve blocks by mmap; trim the heap only when 512 MiB are free at its top.
    const TRIM_THRESHOLD: libc::c_int = 512 * 1024 * 1024;
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
