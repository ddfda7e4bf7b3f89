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

/// Cap glibc's malloc arenas at `n` (call before any thread starts). By
/// default glibc gives each thread that allocates while another holds an
/// arena a new one, up to 8 per core, and an arena keeps the pages it
/// touched: the blocking pool, the epoch ticker, the compile and exporter
/// threads each left their own partly used heap in an idle sidecar. One
/// arena per worker thread plus one for all the others keeps the request
/// path's allocations uncontended.
pub fn limit_arenas(n: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` sets a glibc tunable under its own lock; it is
    // called before the process starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, i32::try_from(n).unwrap_or(i32::MAX));
    }
}

/// After a configuration build: the heap's free pages and the embedded
/// `builtins`' pages go back to the system.
pub fn release_after_build(builtins: &[(&'static str, &'static [u8])]) {
    release_code();
    release_free_heap();
    release_embedded(builtins.iter().map(|(_, b)| *b));
}

/// Unmap the executable's code and read-only data from this process: the
/// pages stay in the page cache, and only what runs again faults back in
/// (a minor fault each, no disk read). What starting and building a
/// configuration ran — argument parsing, the config parser, linking the
/// plugins, reading the compile cache — is then no longer resident while
/// the sidecar serves (idle, ≈ 9 MB of the executable's pages were).
///
/// Only mappings of the executable with no private copy of any page
/// (`Anonymous: 0 kB`: nothing was relocated or written there) are
/// dropped, so every page reads back exactly as it was.
pub fn release_code() {
    #[cfg(target_os = "linux")]
    {
        let (Ok(exe), Ok(smaps)) = (
            std::fs::read_link("/proc/self/exe"),
            std::fs::read_to_string("/proc/self/smaps"),
        ) else {
            return;
        };
        for (start, end) in unwritten_mappings(&smaps, &exe.to_string_lossy()) {
            // SAFETY: the range is a whole mapping of the executable, read
            // only, with no anonymous (copied-on-write) page: MADV_DONTNEED
            // drops its page table entries and the next access maps the
            // same file page again, so every byte reads the same value
            // after. Code running in it meanwhile just faults.
            let _ = unsafe {
                rustix::mm::madvise(
                    start as *mut std::ffi::c_void,
                    end - start,
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
        }
    }
}

/// The read-only mappings (`r-xp`, `r--p`) of `path` in `smaps` text
/// without a single anonymous page, as address ranges.
fn unwritten_mappings(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    // The mapping being read: its range, and whether it still qualifies.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            found.extend(current.take());
            let perms = fields.next().unwrap_or_default();
            let name = line
                .splitn(6, char::is_whitespace)
                .nth(5)
                .unwrap_or_default()
                .trim();
            if (perms == "r-xp" || perms == "r--p") && name == path {
                current = Some((a, b));
            }
        } else if first == "Anonymous:" && fields.next() != Some("0") {
            current = None;
        }
    }
    found.extend(current);
    found
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_mappings_of_the_executable_without_private_pages_are_released() {
        let smaps = "\
1000-2000 r--p 00000000 fe:00 42                         /usr/bin/wasmesh
Rss:                  12 kB
Anonymous:             0 kB
2000-5000 r-xp 00001000 fe:00 42                         /usr/bin/wasmesh
Anonymous:             0 kB
VmFlags: rd ex mr mw me
5000-6000 r--p 00004000 fe:00 42                         /usr/bin/wasmesh
Anonymous:             4 kB
6000-7000 rw-p 00005000 fe:00 42                         /usr/bin/wasmesh
Anonymous:             0 kB
7000-8000 r-xp 00000000 fe:00 43                         /usr/lib/libc.so.6
Anonymous:             0 kB
8000-9000 r-xp 00000000 00:00 0
Anonymous:             0 kB
a000-b000 r-xp 00000000 fe:00 42                         /usr/bin/wasmesh
Anonymous:             0 kB
";
        assert_eq!(
            unwritten_mappings(smaps, "/usr/bin/wasmesh"),
            [(0x1000, 0x2000), (0x2000, 0x5000), (0xa000, 0xb000)]
        );
    }
}
