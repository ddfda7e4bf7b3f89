//! Handing freed heap back to the system after a configuration build.
//!
//! Compiling components (Cranelift, on a thread pool) allocates tens of MiB
//! that are freed when the build ends, but glibc keeps freed memory in its
//! per-thread arenas: without a trim, a sidecar that compiled five plugins
//! stays ≈ 80 MiB resident for its whole life instead of ≈ 25 MiB.
//!
//! Also the process's allocator ([`Allocator`]): the system's, with a few
//! freed blocks of 1–8 KiB kept for the next request.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The sizes [`Allocator`] keeps: above glibc's per-thread cache, which
/// serves up to 1,032 bytes, up to hyper's 8 KiB HTTP/1 read buffer.
const SMALLEST: usize = 1033;
const LARGEST: usize = 8 * 1024;

/// Kept sizes are rounded up to a multiple of this: each class's blocks
/// are all of its size, so any request of the class fits any of them.
const CLASS: usize = 512;

/// The classes: sizes up to 512, 1,024, … 8,192 bytes (the first two
/// unused, below [`SMALLEST`]).
const CLASSES: usize = LARGEST / CLASS;

/// Freed blocks kept at most per class (at most 8 × (1.5 + 2 + … + 8) KiB
/// ≈ 0.5 MiB in all, 64 KiB of it 8 KiB blocks).
const KEPT: usize = 8;

/// The alignment every kept block is allocated with (the system's own for
/// such sizes on 64-bit glibc), so that it suits any request of its class
/// up to that alignment.
const ALIGN: usize = 16;

/// The freed blocks kept, per class, each slot empty (null) or holding one.
static KEPT_BLOCKS: [[AtomicPtr<u8>; KEPT]; CLASSES] =
    [const { [const { AtomicPtr::new(null_mut()) }; KEPT] }; CLASSES];

/// The system allocator, keeping up to [`KEPT`] freed blocks of each size
/// class between 1,033 bytes and 8 KiB for the next allocation of that
/// class.
///
/// glibc serves those sizes from its unsorted and large bins, not its
/// per-thread cache (which stops at 1,032 bytes), at ≈ 430 instructions a
/// `malloc`, plus the `free`'s coalescing and, now and then, a
/// `malloc_consolidate` of its fast bins (`benches/compare/instructions`).
/// A request on the proxy's path makes several: hyper reads each HTTP/1
/// connection into an 8 KiB buffer and allocates a new one when it makes
/// room for the next message while the previous one's bytes are still
/// shared (≈ 1.7 times a request on a proxied keep-alive exchange); a
/// request's and a response's `http::HeaderMap` each hold their headers in
/// one vector of ≈ 100 bytes an entry, over 1 KiB from about ten headers (a
/// request between two sidecars carries the forwarding headers too).
/// Another allocator took that cost off but raised an idle sidecar's RSS
/// by 1–35 MB (jemalloc, mimalloc: benches/RESULTS.md); these slots keep
/// at most ≈ 0.5 MiB.
///
/// Every block of a class is allocated from the system at the class's size
/// and [`ALIGN`], whether it is first handed out or comes from a slot, and
/// goes back to the system with that layout: whichever path frees it, it
/// goes back where it came from.
pub struct Allocator;

/// The class of `layout` when its blocks are kept: its index in
/// [`KEPT_BLOCKS`].
#[inline]
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (size.wrapping_sub(SMALLEST) <= LARGEST - SMALLEST && layout.align() <= ALIGN)
        .then(|| (size - 1) / CLASS)
}

/// The layout every block of `class` is allocated with.
fn block(class: usize) -> Layout {
    // SAFETY: for a class below CLASSES, a non-zero size of at most 8 KiB
    // and a power-of-two alignment: a valid layout.
    unsafe { Layout::from_size_align_unchecked((class + 1) * CLASS, ALIGN) }
}

/// A kept block of `class`, or a new one from the system.
#[inline(never)]
fn take(class: usize) -> *mut u8 {
    for slot in &KEPT_BLOCKS[class] {
        // A plain load first: an empty slot costs no locked instruction.
        if !slot.load(Ordering::Relaxed).is_null() {
            let p = slot.swap(null_mut(), Ordering::Acquire);
            if !p.is_null() {
                return p;
            }
        }
    }
    // SAFETY: a valid, non-zero-sized layout.
    unsafe { System.alloc(block(class)) }
}

/// Keep `ptr`, a freed block of `class`, or give it back to the system.
///
/// # Safety
///
/// `ptr` is a block of `class` (allocated with [`block`]`(class)`) that no
/// one holds any more.
#[inline(never)]
unsafe fn keep(class: usize, ptr: *mut u8) {
    for slot in &KEPT_BLOCKS[class] {
        if slot.load(Ordering::Relaxed).is_null()
            && slot
                .compare_exchange(null_mut(), ptr, Ordering::Release, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
    }
    // SAFETY: every block of the class came from `System` with its layout.
    unsafe { System.dealloc(ptr, block(class)) }
}

// SAFETY: every pointer returned is either `System`'s answer for the
// caller's layout, or (for a kept class) a block `System` allocated with the
// class's layout — at least as large and as aligned as the caller's — that
// is either new or was freed to us (so no one else holds it); each kept
// block sits in exactly one slot (taken with a swap, put with a
// compare-exchange from null), so it is handed out at most once. Every
// block is freed to `System` with the layout it was allocated with.
unsafe impl GlobalAlloc for Allocator {
    // The checks inline at every call site; a kept class's work does not.
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: the caller's layout, as given.
            None => unsafe { System.alloc(layout) },
            Some(class) => take(class),
        }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: `ptr` came from `System` for this layout.
            None => unsafe { System.dealloc(ptr, layout) },
            // SAFETY: the caller frees `ptr`, a block of `class`, once.
            Some(class) => unsafe { keep(class, ptr) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if class_of(layout).is_none() {
            // SAFETY: the caller's layout, as given.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: the caller's layout; the block holds at least its size.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // `GlobalAlloc::realloc`'s contract makes `new_size` with
        // `layout`'s alignment a valid layout.
        let new = Layout::from_size_align(new_size, layout.align()).ok();
        let (old_class, new_class) = (class_of(layout), new.and_then(class_of));
        if old_class.is_none() && new_class.is_none() {
            // SAFETY: `ptr` came from `System` for `layout`.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if old_class.is_some() && old_class == new_class {
            // The block is the class's size: the new size fits as it is.
            return ptr;
        }
        let Some(new) = new else {
            return null_mut();
        };
        // SAFETY: a fresh block for `new`; `ptr` holds `layout.size()`
        // readable bytes and the two do not overlap; `ptr` is then freed
        // once, with its own layout.
        unsafe {
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
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
    fn freed_blocks_of_1_to_8_kib_are_kept_per_class_up_to_the_cap_and_handed_out_again() {
        // The test process's own allocator is the system's: this one is
        // used directly, by this test alone.
        let a = Allocator;
        let layout = |size, align| Layout::from_size_align(size, align).unwrap();
        let block = layout(LARGEST, 1);
        let kept = |class: usize| {
            KEPT_BLOCKS[class]
                .iter()
                .filter(|s| !s.load(Ordering::Relaxed).is_null())
                .count()
        };
        let top = CLASSES - 1;
        // SAFETY: each pointer is freed once, with the layout it was
        // allocated (or last reallocated) with, and written only within it.
        unsafe {
            let p = a.alloc(block);
            p.write_bytes(7, LARGEST);
            a.dealloc(p, block);
            assert_eq!(kept(top), 1);
            assert_eq!(a.alloc(block), p, "the kept block is handed out again");
            assert_eq!(kept(top), 0);
            a.dealloc(p, block);
            // More freed than kept: the rest go back to the system.
            let many: Vec<_> = (0..KEPT + 3).map(|_| a.alloc(block)).collect();
            for p in many {
                a.dealloc(p, block);
            }
            assert_eq!(kept(top), KEPT);

            // One class, 1,025–1,536 bytes (from 1,033): any size of it,
            // any alignment up to 16, gets the same block, zeroed on demand.
            let entries = layout(1400, 8);
            let q = a.alloc(entries);
            q.write_bytes(1, 1400);
            a.dealloc(q, entries);
            assert_eq!(kept(2), 1);
            let z = a.alloc_zeroed(layout(1536, 16));
            assert_eq!(z, q);
            assert!(std::slice::from_raw_parts(z, 1536).iter().all(|b| *b == 0));
            // Grown within its class: the same block; past it: moved, the
            // bytes with it, and the old block kept.
            z.write_bytes(9, 1536);
            assert_eq!(a.realloc(z, layout(1536, 16), 1100), z);
            let moved = a.realloc(z, layout(1100, 16), 3000);
            assert_ne!(moved, z);
            assert!(
                std::slice::from_raw_parts(moved, 1100)
                    .iter()
                    .all(|b| *b == 9)
            );
            assert_eq!((kept(2), kept(5)), (1, 0));
            a.dealloc(moved, layout(3000, 16));
            assert_eq!(kept(5), 1);

            // Other sizes and alignments pass through.
            for other in [layout(1032, 8), layout(LARGEST + 1, 1), layout(2048, 32)] {
                let r = a.alloc(other);
                assert_eq!(r as usize % other.align(), 0);
                a.dealloc(r, other);
            }
            assert_eq!((kept(top), kept(2), kept(3), kept(4)), (KEPT, 1, 0, 0));
            // Out of the range both ways, through the system's realloc.
            let small = a.realloc(a.alloc(layout(100, 1)), layout(100, 1), 900);
            a.dealloc(small, layout(900, 1));
            let grown = a.realloc(a.alloc(block), block, 2 * LARGEST);
            a.dealloc(grown, layout(2 * LARGEST, 1));
            assert_eq!(kept(top), KEPT, "the block it moved from is kept again");
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
