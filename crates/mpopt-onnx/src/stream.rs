//! A [`BufMut`] that streams into a file through a fixed buffer, so that encoding a model never holds the
//! whole encoded message in memory (a 300 MB model saves with one 256 KiB buffer).
//!
//! The buffer is small on purpose: it stays in cache, and its pages are allocated (and zeroed by the kernel)
//! once. With 8 MiB, fresh-page zeroing was a third of a conversion's time on the 20-70 MB corpus models.
//! `put_slice` sends slices of 64 KiB or more to the writer directly. prost writes `bytes` fields through
//! `BufMut::put`, whose default copies chunk by chunk through the buffer; routing those through `put_slice`
//! was measured too, and made no difference beyond the noise (and `mpopt copy` of paraphrase slower, the
//! kernel faulting the input's mmap during the write), so it is not done.

use std::io::Write;

use bytes::BufMut;
use bytes::buf::UninitSlice;

const CAP: usize = 256 << 10;
/// Slices at least this long bypass the buffer (when written with `put_slice`).
const DIRECT: usize = 64 << 10;

pub(crate) struct StreamBuf<W: Write> {
    out: W,
    buf: Vec<u8>,
    written: u64,
    err: Option<std::io::Error>,
}

impl<W: Write> StreamBuf<W> {
    pub(crate) fn new(out: W) -> Self {
        StreamBuf {
            out,
            buf: Vec::with_capacity(CAP),
            written: 0,
            err: None,
        }
    }

    fn flush_buf(&mut self) {
        if self.err.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.err = Some(e);
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Flushes and returns the writer and the byte count, or the first write error.
    pub(crate) fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.flush_buf();
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity, which is never empty after the flush check, and
// `advance_mut` only extends the length over bytes the caller has initialized, as the trait requires.
unsafe impl<W: Write> BufMut for StreamBuf<W> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance past the buffer");
        // SAFETY: the caller initialized `cnt` bytes of the spare capacity (trait contract).
        unsafe { self.buf.set_len(len) };
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= DIRECT {
            // Large tensors go straight to the writer, skipping the copy into the buffer.
            self.flush_buf();
            if self.err.is_none()
                && let Err(e) = self.out.write_all(src)
            {
                self.err = Some(e);
            }
            self.written += src.len() as u64;
        } else {
            let room = self.buf.capacity() - self.buf.len();
            if src.len() > room {
                self.flush_buf();
            }
            self.buf.extend_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_small_and_large_writes_in_order() {
        let mut sb = StreamBuf::new(Vec::new());
        let big = vec![7u8; CAP + 3];
        sb.put_slice(b"head");
        sb.put_u32_le(0x01020304);
        sb.put_slice(&big);
        sb.put_u8(9);
        let (out, n) = sb.finish().unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(&out[..8], b"head\x04\x03\x02\x01");
        assert_eq!(out.len(), 8 + CAP + 3 + 1);
        assert_eq!(out[out.len() - 1], 9);
    }
}
