//! The process's global allocator: mimalloc, entered by its plain
//! `mi_malloc` family whenever the layout asks for no more alignment than
//! every mimalloc block of its size has: a word, and 16 bytes for blocks of
//! 16 bytes or more on 64-bit targets (boxed futures holding a timer are
//! 16-byte aligned).
//!
//! Why not `mimalloc::MiMalloc`: it calls `mi_malloc_aligned` for every
//! layout, and mimalloc serves an aligned request above 1 KiB through its
//! generic path (a size-class lookup, then over-allocation for a size that
//! is not a power of two), ~100 to 300 instructions more than `mi_malloc`.
//! A small request through the gateway makes about eight such allocations
//! (read buffers, header maps, boxed futures), measured with callgrind
//! (`loadtest/instr_per_request.sh`).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc's blocks are all aligned to a word (its own `realloc` relies
/// on it: `mi_realloc_aligned` skips the aligned path at this alignment).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc's `MI_MAX_ALIGN_SIZE` (`sizeof(max_align_t)`): on 64-bit
/// targets its size classes of two words or more are multiples of two
/// words (`MI_ALIGN2W` in `page-queue.c`) and a page's first block is
/// aligned to this (`MI_PAGE_MIN_START_BLOCK_ALIGN`), so every block of at
/// least this many bytes is aligned to it. On 32-bit targets the word is
/// 4 bytes and the claim is not made.
const MAX_ALIGN: usize = if WORD == 8 { 16 } else { WORD };

/// A block of `size` bytes from the plain entry points is aligned enough
/// for `align`.
#[inline(always)]
fn plain_fits(size: usize, align: usize) -> bool {
    align <= WORD || (align <= MAX_ALIGN && size >= align)
}

pub struct MiMalloc;

// SAFETY: every method forwards to mimalloc with a layout's size, and asks
// for the layout's alignment explicitly unless every block mimalloc returns
// for that size already has it (`plain_fits`). Blocks are freed by `mi_free`
// whichever entry point allocated them.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain_fits(layout.size(), layout.align()) {
            unsafe { mi::mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain_fits(layout.size(), layout.align()) {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The new block must fit the alignment at its new size.
        if plain_fits(new_size, layout.align()) {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class up to 64 KiB and every alignment up to 4 KiB comes
    /// back aligned, writable, zeroed when asked, and keeps its bytes
    /// through a reallocation that grows and one that shrinks.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let a = MiMalloc;
        let mut size = 1;
        while size <= 64 * 1024 {
            for align in [1, 2, 4, 8, 16, 64, 4096] {
                for s in [size, size + 1, size * 3 / 2 + 1] {
                    let l = Layout::from_size_align(s, align).unwrap();
                    unsafe {
                        let z = a.alloc_zeroed(l);
                        assert!(!z.is_null());
                        assert_eq!(z as usize % align, 0, "zeroed {s} at {align}");
                        assert!(std::slice::from_raw_parts(z, s).iter().all(|&b| b == 0));
                        a.dealloc(z, l);

                        let p = a.alloc(l);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "{s} at {align}");
                        for i in 0..s {
                            *p.add(i) = i as u8;
                        }
                        let grown = a.realloc(p, l, s * 2 + 100);
                        assert_eq!(grown as usize % align, 0, "grown {s} at {align}");
                        let gl = Layout::from_size_align(s * 2 + 100, align).unwrap();
                        for i in 0..s {
                            assert_eq!(*grown.add(i), i as u8);
                        }
                        let half = s.div_ceil(2);
                        let shrunk = a.realloc(grown, gl, half);
                        assert_eq!(shrunk as usize % align, 0, "shrunk {s} at {align}");
                        for i in 0..half {
                            assert_eq!(*shrunk.add(i), i as u8);
                        }
                        a.dealloc(shrunk, Layout::from_size_align(half, align).unwrap());
                    }
                }
            }
            size *= 2;
        }
    }

    /// The plain entry points' claim for 16-byte layouts: every block of a
    /// page, not only the first, in every size class a 16-byte-aligned type
    /// can have (a multiple of 16) up to 16 KiB, and at sizes that are not
    /// multiples, is aligned (many blocks are live at once, so they come
    /// from across the pages, not one reused block).
    #[test]
    fn sixteen_byte_layouts_from_the_plain_entry_points_are_aligned() {
        let a = MiMalloc;
        for size in (16..=16 * 1024)
            .step_by(16)
            .chain([17, 24, 40, 56, 72, 1000])
        {
            let l = Layout::from_size_align(size, 16).unwrap();
            assert!(plain_fits(size, 16) || WORD != 8);
            let blocks: Vec<*mut u8> = (0..64)
                .map(|_| unsafe { a.alloc(l) })
                .chain((0..64).map(|_| unsafe { a.alloc_zeroed(l) }))
                .collect();
            for &p in &blocks {
                assert!(!p.is_null());
                assert_eq!(p as usize % 16, 0, "{size} bytes");
                unsafe { a.dealloc(p, l) };
            }
        }
        // Smaller than the alignment: the aligned entry point.
        assert!(!plain_fits(8, 16));
    }
}
