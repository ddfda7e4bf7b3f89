//! Handing freed heap back to the system after a configuration build.
//!
//! Compiling components (Cranelift, on a thread pool) allocates tens of MiB
//! that are freed when the build ends, but glibc keeps freed memory in its
//! per-thread arenas: without a trim, a sidecar that compiled five plugins
//! stays ≈ 80 MiB resident for its whole life instead of ≈ 25 MiB.
#![allow(unsafe_code)]

/// Return the heap's free pages to the system (glibc's `malloc_trim`).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only walks glibc's own arenas under their
    // locks; it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// After a configuration build: the heap's free pages and the embedded
/// `builtins`' pages go back to the system.
pub fn release_after_build(builtins: &[(&'static str, &'static [u8])]) {
    release_free_heap();
    release_embedded(builtins.iter().map(|(_, b)| *b));
}

/// Take bytes embedded in the executable (the stock plugins' wasm, read to
/// hash and compile a configuration) out of this process's resident set
/// once a build is over; the next build reads them back from the
/// executable's page cache. Idle, a sidecar then holds only what serves.
fn release_embedded<'a>(slices: impl IntoIterator<Item = &'a [u8]>) {
    #[cfg(target_os = "linux")]
    {
        // A multiple of every page size Linux uses (4, 16 and 64 KiB); asking
        // the C library or the auxiliary vector for it is not worth a few
        // KiB.
        let page = 64 * 1024;
        for bytes in slices {
            // Whole pages inside the slice only: a neighbour's bytes stay.
            let start = (bytes.as_ptr() as usize).next_multiple_of(page);
            let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
            if end <= start {
                continue;
            }
            // SAFETY: MADV_PAGEOUT never changes memory contents: it asks the
            // kernel to reclaim the pages (clean file pages are dropped and
            // read back on the next access, anonymous ones go to swap or stay),
            // so every reference to these bytes reads the same values after.
            // The range lies inside one live allocation, the `'static` slice.
            let _ = unsafe {
                rustix::mm::madvise(
                    start as *mut std::ffi::c_void,
                    end - start,
                    rustix::mm::Advice::LinuxPageOut,
                )
            };
        }
    }
}
