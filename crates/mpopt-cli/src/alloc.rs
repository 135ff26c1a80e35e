//! The process's allocator: mimalloc, asked for a plain block wherever a plain block is aligned enough.
//!
//! The `mimalloc` crate's allocator passes every request to mimalloc's aligned functions
//! (`mi_malloc_aligned(size, align)`), and in mimalloc v3 those take a slow path whenever the size class's
//! current page has no free block left, which is the first allocation of every fresh page: a block of a
//! size that is not a power of two is then over-allocated by `align - 1` bytes from the next size class and
//! its page marked as holding interior pointers (mimalloc issue #889; the `mimalloc` crate's pull request
//! #170 proposes the change made here). Converting silero_vad_v6 made 41,330 allocations, 5,979 of them
//! through that path (callgrind). Rust's own `System` allocator asks `malloc` for a plain block whenever the
//! alignment is at most `malloc`'s and at most the size; this does the same with mimalloc, whose plain
//! blocks are 16-byte aligned as C's `malloc` must be, and checks each such block's address anyway (a
//! mimalloc built with padding, as in its debug and secure modes, gives 8-byte aligned blocks): a block not
//! aligned enough is freed and the aligned function asked instead.
//!
//! Example: `Layout { size: 24, align: 8 }` is `mi_malloc(24)`; `Layout { size: 64, align: 64 }` is
//! `mi_malloc_aligned(64, 64)`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every plain block of at least this many bytes (`MI_MAX_ALIGN_SIZE`, C's
/// `alignof(max_align_t)` on 64-bit targets).
const PLAIN_ALIGN: usize = 16;

/// mimalloc, with plain requests where they suffice (see the module's doc).
pub(crate) struct Mimalloc;

/// True when a plain block of `layout.size()` bytes should have `layout`'s alignment.
fn plain(layout: &Layout) -> bool {
    layout.align() <= PLAIN_ALIGN && layout.align() <= layout.size()
}

/// True when `p` is null (the caller reports the failure) or aligned to `align`.
fn usable(p: *mut c_void, align: usize) -> bool {
    p.is_null() || p.addr() & (align - 1) == 0
}

/// A block for `layout` from `plain_fn` (mimalloc's malloc or zalloc) when [`plain`] and aligned enough,
/// else from `aligned_fn` (their aligned forms).
///
/// # Safety
/// `layout` has a non-zero size (GlobalAlloc's contract).
#[inline]
unsafe fn block(
    layout: Layout,
    plain_fn: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_fn: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    if plain(&layout) {
        // SAFETY: mimalloc's malloc and zalloc take any size.
        let p = unsafe { plain_fn(layout.size()) };
        if usable(p, layout.align()) {
            return p.cast();
        }
        // SAFETY: `p` came from mimalloc and is not used again.
        unsafe { mi::mi_free(p) };
    }
    // SAFETY: `layout.align()` is a power of two (Layout's invariant).
    unsafe { aligned_fn(layout.size(), layout.align()) }.cast()
}

// SAFETY: every block comes from mimalloc with at least the layout's size and alignment (checked for plain
// blocks), and every block is given back to mimalloc's `mi_free`, which frees blocks from any of its
// allocation functions, aligned or not.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract.
        unsafe { block(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract.
        unsafe { block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast()) };
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (the caller's contract): `new_size` rounded up to the alignment does not overflow.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !plain(&new) {
            // SAFETY: `ptr` came from mimalloc; the alignment is a power of two.
            return unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()) }.cast();
        }
        // mimalloc's own realloc, made of this allocator's parts: `mi_realloc` would free the old block
        // before its result's alignment could be checked, and a failed fallback would then have lost the
        // data. In place when the block already holds `new_size` bytes and would not be more than half
        // empty (mimalloc's rule); else a new block, the bytes copied, the old block freed.
        // SAFETY: `ptr` came from mimalloc.
        let room = unsafe { mi::mi_usable_size(ptr.cast()) };
        if new_size <= room && new_size >= room / 2 {
            return ptr;
        }
        // SAFETY: `new` has a non-zero size (plain: align <= size, and align >= 1).
        let moved = unsafe { self.alloc(new) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the bytes copied, and a fresh block does not overlap `ptr`;
            // `ptr` is freed once, after the copy.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                mi::mi_free(ptr.cast());
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size and alignment the program asks for are aligned, hold their bytes across
    /// growth and shrinking, and come back zeroed from `alloc_zeroed`.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1usize, 3, 8, 24, 40, 100, 1000, 5000, 70_000] {
                let Ok(layout) = Layout::from_size_align(size.next_multiple_of(align), align)
                else {
                    continue;
                };
                // SAFETY: a non-zero size; every block is freed once with its layout.
                unsafe {
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z.addr() % align, 0, "zeroed {layout:?}");
                    assert!(
                        std::slice::from_raw_parts(z, layout.size())
                            .iter()
                            .all(|&b| b == 0)
                    );
                    a.dealloc(z, layout);

                    let p = a.alloc(layout);
                    assert_eq!(p.addr() % align, 0, "{layout:?}");
                    for i in 0..layout.size() {
                        *p.add(i) = i as u8;
                    }
                    let mut cur = (p, layout);
                    for new_size in [layout.size() * 3, layout.size() + 1, layout.size() / 2 + 1] {
                        let new_size = new_size.next_multiple_of(align);
                        let q = a.realloc(cur.0, cur.1, new_size);
                        assert_eq!(q.addr() % align, 0, "{layout:?} -> {new_size}");
                        let kept = cur.1.size().min(new_size).min(layout.size());
                        for i in 0..kept {
                            assert_eq!(*q.add(i), i as u8, "{layout:?} -> {new_size}, byte {i}");
                        }
                        cur = (q, Layout::from_size_align(new_size, align).unwrap());
                    }
                    a.dealloc(cur.0, cur.1);
                }
            }
        }
    }

    /// The choice of path: plain only where a plain block is aligned enough.
    #[test]
    fn plain_only_for_small_alignments_within_the_size() {
        let l = |size, align| Layout::from_size_align(size, align).unwrap();
        assert!(plain(&l(24, 8)));
        assert!(plain(&l(16, 16)));
        assert!(plain(&l(1, 1)));
        assert!(!plain(&l(64, 64)));
        assert!(!plain(&l(8, 16)));
    }
}
