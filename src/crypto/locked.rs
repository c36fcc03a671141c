//! Page-locked storage for long-lived key material (KEKs, root keys).
//!
//! Each key gets a page of its own, so it can be `mlock`ed (never swapped) and marked
//! `MADV_DONTDUMP` (left out of core dumps) without affecting anything else, and unlocked on
//! drop without unlocking a neighbour. Where the memlock limit forbids locking, the key still
//! works and one warning says so. With `wipe_on_free`, one of the crate's two `unsafe` modules.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

use super::KEY_LEN;

const PAGE: usize = 4096;

/// One page holding one key. The alignment makes the allocation exactly one page.
#[repr(C, align(4096))]
pub(crate) struct LockedPage {
    bytes: [u8; KEY_LEN],
    locked: bool,
}

static LOCK_WARNED: AtomicBool = AtomicBool::new(false);
static PAGE_WARNED: AtomicBool = AtomicBool::new(false);

/// Whether this kernel's pages are the size key pages are laid out for. On 16 KiB or 64 KiB
/// pages, locking one key's page would lock (and unlocking it release) its neighbours, so keys
/// are then left unlocked, with a warning, rather than locked wrongly.
fn pages_fit() -> bool {
    rustix::param::page_size() == PAGE
}

/// Whether key material can be locked in memory here (memlock limit, CAP_IPC_LOCK, page size):
/// what `serve --require-mlock` insists on.
pub fn can_lock_keys() -> bool {
    LockedPage::new().locked
}

impl LockedPage {
    /// A zeroed page, locked and excluded from core dumps where the system allows.
    pub(crate) fn new() -> Box<Self> {
        let mut page = Box::new(LockedPage {
            bytes: [0u8; KEY_LEN],
            locked: false,
        });
        if !pages_fit() {
            if !PAGE_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    page_size = rustix::param::page_size(),
                    "this kernel's memory pages are not 4096 bytes: key pages are not locked or kept out of core dumps individually (core dumps are still off for the whole process)"
                );
            }
            return page;
        }
        let ptr = std::ptr::from_mut::<LockedPage>(&mut page).cast::<std::ffi::c_void>();
        // SAFETY: `ptr` is the start of a live, page-aligned allocation of exactly PAGE bytes
        // (size_of::<LockedPage>() == PAGE, which is the kernel's page size, checked above),
        // owned by `page` for as long as the lock is held; mlock and madvise only change
        // paging attributes of that range.
        let locked = unsafe { rustix::mm::mlock(ptr, PAGE) }.is_ok();
        // SAFETY: as above; MADV_DONTDUMP does not alter the contents of the range.
        let _ = unsafe { rustix::mm::madvise(ptr, PAGE, rustix::mm::Advice::LinuxDontDump) };
        if locked {
        } else if !LOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot lock key pages in memory (RLIMIT_MEMLOCK too low, or no CAP_IPC_LOCK): keys may be swapped to disk");
        }
        page.locked = locked;
        page
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.bytes
    }
}

impl Drop for LockedPage {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if !pages_fit() {
            return;
        }
        let ptr = std::ptr::from_mut::<LockedPage>(self).cast::<std::ffi::c_void>();
        // Restore the page's attributes before the allocator reuses it: otherwise every freed
        // key page stays a separate memory mapping, and churn (reloads) could exhaust
        // vm.max_map_count.
        // SAFETY: the same page-aligned, PAGE-sized allocation set up in `new`, still live
        // during drop; munlock and madvise only change its paging attributes.
        let _ = unsafe { rustix::mm::madvise(ptr, PAGE, rustix::mm::Advice::LinuxDoDump) };
        if self.locked {
            // SAFETY: as above.
            let _ = unsafe { rustix::mm::munlock(ptr, PAGE) };
        }
    }
}

const _: () = assert!(std::mem::size_of::<LockedPage>() == PAGE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_page_aligned_and_wiped_on_drop() {
        let mut page = LockedPage::new();
        let addr = std::ptr::from_ref::<LockedPage>(&page) as usize;
        assert_eq!(addr % PAGE, 0);
        page.bytes_mut().copy_from_slice(&[7u8; KEY_LEN]);
        assert_eq!(page.bytes(), &[7u8; KEY_LEN]);
        // As root (CI), locking works; elsewhere it may legitimately be refused.
        if rustix::process::geteuid().is_root() {
            assert!(page.locked, "root must be able to mlock a page");
        }
    }
}
