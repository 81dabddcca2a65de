//! One worker's provided-buffer ring (`IORING_REGISTER_PBUF_RING`), the memory every multishot
//! receive of that worker lands in.
//!
//! Owns two anonymous mappings: the ring of `BufRingEntry` descriptors shared with the kernel and
//! the buffers themselves. It hands out a buffer's bytes only for a buffer id the kernel returned
//! in a completion, and gives it back on [`BufRing::recycle`]. It must not outlive the
//! registration: the worker declares its `IoUring` before its `BufRing`, so the ring (and with it
//! the registration) is dropped first. It knows nothing of sockets or sessions.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// An anonymous private mapping: page aligned and zero filled, as the buffer-ring ABI requires.
struct Region {
    addr: NonNull<u8>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr =
            NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        // A forked child (a later `Command` spawn) must not share memory the kernel writes into.
        // SAFETY: the range is exactly the mapping created above.
        unsafe { libc::madvise(addr.as_ptr().cast(), len, libc::MADV_DONTFORK) };
        Ok(Region { addr, len })
    }

    fn ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `Region::new` with this length and is unmapped once.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// Layout of `struct io_uring_buf_status` (`IORING_REGISTER_PBUF_STATUS`, Linux 6.8).
#[repr(C)]
#[derive(Default)]
struct BufStatus {
    buf_group: u32,
    head: u32,
    resv: [u32; 8],
}

const IORING_REGISTER_PBUF_STATUS: libc::c_uint = 26;

/// A registered ring of `count` buffers of `size` bytes, buffer group `bgid`.
pub(crate) struct BufRing {
    entries: Region,
    memory: Region,
    mask: u16,
    count: u16,
    size: u32,
    /// Our copy of the tail; published to the kernel by [`BufRing::publish`].
    tail: u16,
    bgid: u16,
}

impl BufRing {
    /// Maps the descriptor ring and the buffers. `count` must be in 1..=32768.
    pub(crate) fn new(count: u16, size: u32, bgid: u16) -> io::Result<BufRing> {
        if count == 0 || count > 1 << 15 || size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let ring_entries = count.next_power_of_two();
        let entries = Region::new(usize::from(ring_entries) * std::mem::size_of::<BufRingEntry>())?;
        let memory = Region::new(usize::from(count) * size as usize)?;
        Ok(BufRing {
            entries,
            memory,
            mask: ring_entries - 1,
            count,
            size,
            tail: 0,
            bgid,
        })
    }

    /// Registers the ring with `submitter`'s io_uring and provides every buffer.
    pub(crate) fn register(&mut self, submitter: &Submitter<'_>) -> io::Result<()> {
        // SAFETY: `entries` holds `mask + 1` descriptors and stays mapped as long as `self`; the
        // owner drops the io_uring (ending the registration) before dropping `self`.
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.entries.ptr() as u64,
                self.mask + 1,
                self.bgid,
                0,
            )?;
        }
        for bid in 0..self.count {
            self.push(bid);
        }
        self.publish();
        Ok(())
    }

    /// The buffer group id receives must name.
    pub(crate) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Total number of buffers.
    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// The first `len` bytes of buffer `bid`, which a completion just handed to us.
    /// Out-of-range ids or lengths (a kernel/ABI mismatch) yield an empty slice.
    pub(crate) fn slice(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.count || len > self.size as usize {
            return &[];
        }
        let offset = usize::from(bid) * self.size as usize;
        // SAFETY: the range lies inside `memory`. The kernel filled buffer `bid` before posting
        // the completion that named it and does not touch it again until `recycle(bid)` puts it
        // back in the ring, which needs `&mut self` and so ends this borrow first.
        unsafe { std::slice::from_raw_parts(self.memory.ptr().add(offset), len) }
    }

    /// Gives buffer `bid` back to the kernel. Call exactly once per completion that carried it.
    pub(crate) fn recycle(&mut self, bid: u16) {
        if bid < self.count {
            self.push(bid);
            self.publish();
        }
    }

    /// Buffers currently available to the kernel, if the kernel can tell (Linux 6.8+).
    pub(crate) fn available(&self, ring_fd: libc::c_int) -> Option<u16> {
        let mut status = BufStatus {
            buf_group: u32::from(self.bgid),
            ..BufStatus::default()
        };
        // SAFETY: `status` is a properly laid out io_uring_buf_status that outlives the call; the
        // kernel only writes `head` into it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring_fd,
                IORING_REGISTER_PBUF_STATUS,
                &mut status as *mut BufStatus,
                1,
            )
        };
        (ret == 0).then(|| self.tail.wrapping_sub(status.head as u16))
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & self.mask);
        let addr = self.memory.ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `idx` is within the mapped descriptors. The slot lies past the tail the kernel
        // has seen, so the kernel does not read it until `publish`; we are the only writer of the
        // tail word that overlays entry 0, and the setters below do not write that word.
        unsafe {
            let entry = &mut *self.entries.ptr().cast::<BufRingEntry>().add(idx);
            entry.set_addr(addr);
            entry.set_len(self.size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail word lives inside the first descriptor of our mapping and is u16
        // aligned; the Release store orders the descriptor writes before the kernel sees the tail.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr().cast::<BufRingEntry>());
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(BufRing::new(0, 16, 0).is_err());
        assert!(BufRing::new(8, 0, 0).is_err());
    }

    #[test]
    fn slice_bounds_are_checked() {
        let ring = BufRing::new(3, 64, 0).expect("map");
        assert_eq!(ring.slice(3, 1).len(), 0);
        assert_eq!(ring.slice(0, 65).len(), 0);
        assert_eq!(ring.slice(2, 64).len(), 64);
    }
}
