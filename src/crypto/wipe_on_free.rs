//! A global allocator that wipes every block when it is freed (and the old block when one is
//! moved by a reallocation), so request plaintexts (data keys) that pass through buffers
//! owned by tonic, h2, hyper and prost do not outlive their call in freed memory. The binary
//! installs it (`src/main.rs`); `LOCALKMS_WIPE_FREED_MEMORY=0` turns the wiping off, for
//! measuring its cost (`localkms bench --compare` against a server started so).
// The allocator is `unsafe` by contract; each block below says why it holds.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether freed blocks are wiped: unknown until the first free reads the environment.
static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const WIPE: u8 = 1;
const KEEP: u8 = 2;

fn wiping() -> bool {
    match MODE.load(Ordering::Relaxed) {
        WIPE => true,
        KEEP => false,
        _ => {
            // Wipe meanwhile: reading the environment allocates and frees, which comes back
            // here and must not read it again.
            MODE.store(WIPE, Ordering::Relaxed);
            let off = std::env::var_os("LOCALKMS_WIPE_FREED_MEMORY").is_some_and(|v| v == "0");
            if off {
                MODE.store(KEEP, Ordering::Relaxed);
            }
            !off
        }
    }
}

/// Writes zeros over `len` bytes at `ptr` in a way the optimiser must keep: the block is
/// about to be freed, and stores into memory that is then freed are otherwise dead.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `ptr..ptr+len` is writable (it is the block being freed).
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // The pointer escapes into an opaque function, so the zeroing stores are observable and
    // cannot be removed as dead before the free.
    std::hint::black_box(ptr);
}

/// The allocator: [`System`], with wiping on free.
pub struct WipeOnFree;

// SAFETY: every method forwards to `System` with the same layout contract; the only addition
// is writing zeros into a block the caller is giving up (dealloc) or that has just been copied
// out of (realloc), both of which are still owned at that point.
unsafe impl GlobalAlloc for WipeOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if wiping() {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until the dealloc below.
            unsafe { wipe(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !wiping() {
            // SAFETY: forwarded with the caller's pointer, layout and size.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A reallocation may move the block and free the old one unwiped: move it here.
        // SAFETY: the caller guarantees `new_size`, rounded to the alignment, fits `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a non-zero-size layout, as the caller guarantees for realloc.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the copy is within both sizes.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realloc_moves_the_contents_and_wipes_the_old_block() {
        let a = WipeOnFree;
        let layout = Layout::from_size_align(64, 8).expect("layout");
        // SAFETY: a fresh 64-byte block, written and grown within its bounds.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xab, 64);
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            assert!(std::slice::from_raw_parts(q, 64).iter().all(|b| *b == 0xab));
            a.dealloc(q, Layout::from_size_align(4096, 8).expect("layout"));
        }
    }
}
