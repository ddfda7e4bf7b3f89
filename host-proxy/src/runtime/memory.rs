//! Handing freed heap back to the system after a configuration build.
//!
//! Compiling components (Cranelift, on a thread pool) allocates tens of MiB
//! that are freed when the build ends, but glibc keeps freed memory in its
//! per-thread arenas: without a trim, a sidecar that compiled five plugins
//! stays ≈ 80 MiB resident for its whole life instead of ≈ 25 MiB.
//!
//! Also the process's allocator ([`Allocator`]): the system's, with a few
//! freed 8 KiB blocks kept for the next request.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The size of the blocks [`Allocator`] keeps: hyper's HTTP/1 read buffer.
const BLOCK: usize = 8 * 1024;

/// Freed blocks kept at most (64 KiB).
const KEPT: usize = 8;

/// The freed blocks kept, each slot empty (null) or holding one.
static KEPT_BLOCKS: [AtomicPtr<u8>; KEPT] = [const { AtomicPtr::new(null_mut()) }; KEPT];

/// The system allocator, keeping up to [`KEPT`] freed 8 KiB blocks for
/// the next allocation of that size.
///
/// hyper reads each HTTP/1 connection into an 8 KiB buffer, and when it
/// makes room for the next message while the previous one's bytes are
/// still shared (the request's headers live until its response ends; a
/// response's until the client has it) it allocates a new buffer: ≈ 1.7
/// times a request on a proxied keep-alive exchange. glibc serves 8 KiB
/// from its unsorted and large bins, not its per-thread cache (which stops
/// at 1,032 bytes), at ≈ 430 instructions a `malloc`, plus the `free`'s
/// coalescing (`benches/compare/instructions`). Another allocator took
/// that cost off but raised an idle sidecar's RSS by 1–35 MB
/// (jemalloc, mimalloc: benches/RESULTS.md); these slots keep at most
/// 64 KiB.
///
/// Only byte-aligned blocks are kept (a `Vec<u8>`'s, as hyper's buffers
/// are), so a kept block always suits the next request for one, on any
/// target; each is the system allocator's own, so whichever path frees it,
/// it goes back where it came from.
pub struct Allocator;

/// Whether `layout` is the kept one: 8 KiB of bytes.
fn kept_size(layout: Layout) -> bool {
    layout.size() == BLOCK && layout.align() == 1
}

// SAFETY: every pointer returned is either `System`'s answer for the same
// layout or a block `System` allocated for the identical layout (8 KiB,
// align 1) and that was freed to us (so no one else holds it); each kept block
// sits in exactly one slot (taken with a swap, put with a compare-exchange
// from null), so it is handed out at most once.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if kept_size(layout) {
            for slot in &KEPT_BLOCKS {
                // A plain load first: an empty slot costs no locked
                // instruction.
                if !slot.load(Ordering::Relaxed).is_null() {
                    let p = slot.swap(null_mut(), Ordering::Acquire);
                    if !p.is_null() {
                        return p;
                    }
                }
            }
        }
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if kept_size(layout) {
            for slot in &KEPT_BLOCKS {
                if slot.load(Ordering::Relaxed).is_null()
                    && slot
                        .compare_exchange(null_mut(), ptr, Ordering::Release, Ordering::Relaxed)
                        .is_ok()
                {
                    return;
                }
            }
        }
        // SAFETY: `ptr` came from `System` (directly or through a slot) for
        // this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is a `System` block (kept blocks are too), and
        // `System.realloc` takes any of its blocks with its layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

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
    fn freed_8_kib_blocks_are_kept_up_to_the_cap_and_handed_out_again() {
        // The test process's own allocator is the system's: this one is
        // used directly, by this test alone.
        let a = Allocator;
        let block = Layout::from_size_align(BLOCK, 1).unwrap();
        let other = Layout::from_size_align(BLOCK + 1, 1).unwrap();
        let kept = || {
            KEPT_BLOCKS
                .iter()
                .filter(|s| !s.load(Ordering::Relaxed).is_null())
                .count()
        };
        // SAFETY: each pointer is freed once, with the layout it was
        // allocated with, and written only within it.
        unsafe {
            let p = a.alloc(block);
            p.write_bytes(7, BLOCK);
            a.dealloc(p, block);
            assert_eq!(kept(), 1);
            assert_eq!(a.alloc(block), p, "the kept block is handed out again");
            assert_eq!(kept(), 0);
            a.dealloc(p, block);
            // More freed than kept: the rest go back to the system.
            let many: Vec<_> = (0..KEPT + 3).map(|_| a.alloc(block)).collect();
            for p in many {
                a.dealloc(p, block);
            }
            assert_eq!(kept(), KEPT);
            // Other sizes and alignments pass through.
            let q = a.alloc(other);
            a.dealloc(q, other);
            let aligned = Layout::from_size_align(BLOCK, 16).unwrap();
            let r = a.alloc(aligned);
            assert_eq!(r as usize % 16, 0);
            a.dealloc(r, aligned);
            assert_eq!(kept(), KEPT);
            let grown = a.realloc(a.alloc(block), block, 2 * BLOCK);
            a.dealloc(grown, Layout::from_size_align(2 * BLOCK, 1).unwrap());
            assert_eq!(kept(), KEPT - 1, "one kept block was taken and grown");
        }
    }

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
