//! A [`BufMut`] that streams into a file through fixed buffers, so that encoding a model never holds the
//! whole encoded message in memory (a 300 MB model saves with three 256 KiB buffers).
//!
//! The buffers are small on purpose: they stay in cache, and their pages are allocated (and zeroed by the
//! kernel) once. With 8 MiB, fresh-page zeroing was a third of a conversion's time on the 20-70 MB corpus
//! models. For a large output a second thread writes the full ones ([`stream_to`]) while the encoder fills
//! the next; a small one is written by the encoding thread ([`WRITER_THREAD_MIN`]).
//!
//! Everything goes through the buffers, `put_slice` of a big tensor too: prost writes `bytes` fields through
//! `BufMut::put`, chunk by chunk, and a slice sent to the file directly from the encoding thread would stop
//! the encoding for the kernel's copy, the very wait the writer thread removes.
//!
//! A narrowed tensor ([`mpopt_ir::Narrowed`]) is converted straight into the buffers: export gives it a
//! placeholder ([`Deferred`]), an address range of the right length that nothing reads, and
//! [`StreamBuf`]'s `put` converts the tensor where prost hands it that range.

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes};
use mpopt_ir::Narrowed;

/// Placeholders for narrowed tensors on a streaming save: each is a [`Bytes`] of the tensor's narrowed length
/// at an address of its own, in an anonymous read-only map that is never touched (no memory behind it), and
/// [`StreamBuf`] converts the tensor where it meets that address. A `ModelProto` holding placeholders must
/// only be encoded into a [`StreamBuf`] that has this table (anything else would read zeros).
#[derive(Default)]
pub(crate) struct Deferred {
    /// The map being handed out, and how much of it is used.
    region: Option<(Bytes, usize)>,
    /// Placeholder address -> tensor.
    at: HashMap<usize, Narrowed>,
}

// Tests refuse the placeholders' map on their thread to take the fallback.
#[cfg(test)]
thread_local! {
    static REFUSE_MAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The error the placeholders' map fails with in tests that refuse it.
fn refused() -> Option<std::io::Error> {
    #[cfg(test)]
    if REFUSE_MAP.get() {
        return Some(std::io::Error::other("refused by the test"));
    }
    None
}

/// Address space reserved at a time for placeholders (more for a larger tensor).
const REGION: usize = 1 << 30;

impl Deferred {
    /// A placeholder for `n` (an empty `Bytes` for an empty tensor). Where the address space cannot be had
    /// (a system with strict overcommit accounting refusing the map), `n`'s converted bytes instead.
    pub(crate) fn placeholder(&mut self, n: &Narrowed) -> Bytes {
        let len = n.byte_len();
        if len == 0 {
            return Bytes::new();
        }
        let fits = self
            .region
            .as_ref()
            .is_some_and(|(r, used)| r.len() - used >= len);
        if !fits {
            // MAP_NORESERVE: address space only; read-only, so nothing can write into it either
            let map = match refused() {
                Some(e) => Err(e),
                None => memmap2::MmapOptions::new()
                    .len(len.max(REGION))
                    .no_reserve_swap()
                    .map_anon(),
            }
            .and_then(|m| m.make_read_only());
            match map {
                Ok(map) => self.region = Some((Bytes::from_owner(map), 0)),
                Err(_) => return n.bytes().clone(),
            }
        }
        let (r, used) = self.region.as_mut().expect("a region was just made");
        let b = r.slice(*used..*used + len);
        *used += len;
        self.at.insert(b.as_ptr() as usize, n.clone());
        b
    }

    /// The tensor whose placeholder is exactly `s`.
    fn get(&self, s: &[u8]) -> Option<&Narrowed> {
        self.at
            .get(&(s.as_ptr() as usize))
            .filter(|n| n.byte_len() == s.len())
    }
}

const CAP: usize = 256 << 10;
/// Buffers in use at most: one being filled, one queued, one being written.
const BUFFERS: usize = 3;

/// Outputs shorter than this are written on the encoding thread; longer ones by a second thread.
///
/// The second thread pays when there is much to write: the two halves of a save, the encoding (most of it
/// copying or converting tensor bytes into the buffer) and the kernel's copy into the page cache in `write`,
/// run one after the other on one core while the other waits (vit_tiny: about 2.5 and 3.4 ms), and
/// paraphrase_minilm (69 MB in, 35 MB written) converts 4.0 ms slower without it (median of 21 paired runs, 2 vCPUs,
/// 2026-12-03). Below this, starting the thread and handing it each buffer (a futex wake of a sleeping
/// thread per buffer, both ways) cost more than the overlap saves: written directly, the conversions of the
/// corpus models with outputs under 3 MB were 0.5-1.5 ms faster (silero_vad_v6 -0.96, ppocrv4_det -1.51,
/// magika -1.09 ms; 31 paired runs). Outputs of 10-12 MB gained from the thread once the encoding itself
/// got faster (`wire.rs`): ddddocr -1.82 ms, vit_tiny -1.87, open_nsfw -1.70 with a limit of 8 MiB instead
/// of 16 (21 paired runs); ppocrv4_rec (6.8 MB) was the same either way (-0.07 ms with a limit of 4 MiB).
pub(crate) const WRITER_THREAD_MIN: u64 = 8 << 20;

/// Encodes through `encode` into `out`, and returns `out` and the byte count, or the first write error.
///
/// `expected` is about how many bytes `encode` writes: from [`WRITER_THREAD_MIN`] on, a second thread
/// writes the full buffers while this one fills the next; below, this thread writes each buffer when it is
/// full. After a write error nothing more is written, and later buffers are dropped.
pub(crate) fn stream_to<W: Write + Send>(
    out: W,
    deferred: Option<&Deferred>,
    expected: u64,
    encode: impl FnOnce(&mut StreamBuf<'_>),
) -> std::io::Result<(W, u64)> {
    if expected < WRITER_THREAD_MIN {
        let mut out = out;
        let direct = Dest::Direct {
            out: &mut out,
            error: None,
        };
        let (dest, written) = encoded(direct, deferred, encode);
        if let Dest::Direct { error: Some(e), .. } = dest {
            return Err(e);
        }
        out.flush()?;
        return Ok((out, written));
    }
    std::thread::scope(|s| {
        let (full_tx, full_rx) = sync_channel::<Vec<u8>>(1);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
        let writer = s.spawn(move || -> std::io::Result<W> {
            let mut out = out;
            for mut buf in full_rx {
                out.write_all(&buf)?;
                buf.clear();
                // the encoder may have finished: then nobody needs the buffer back
                let _ = empty_tx.try_send(buf);
            }
            out.flush()?;
            Ok(out)
        });
        let thread = Dest::Thread {
            full: Some(full_tx),
            empty: empty_rx,
            made: 1,
        };
        let (dest, written) = encoded(thread, deferred, encode);
        // the writer's loop ends when the sender is gone
        drop(dest);
        let out = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        Ok((out, written))
    })
}

/// Runs `encode` into a [`StreamBuf`] over `dest` and passes on its last buffer; returns the destination
/// (holding a write error, if any) and the bytes encoded.
fn encoded<'a>(
    dest: Dest<'a>,
    deferred: Option<&'a Deferred>,
    encode: impl FnOnce(&mut StreamBuf<'_>),
) -> (Dest<'a>, u64) {
    let mut sb = StreamBuf {
        buf: Vec::with_capacity(CAP),
        dest,
        written: 0,
        deferred,
    };
    encode(&mut sb);
    sb.flush_buf();
    (sb.dest, sb.written)
}

/// Where [`StreamBuf`]'s full buffers go.
enum Dest<'a> {
    /// To [`stream_to`]'s writer thread.
    Thread {
        /// To the writer; None once it has stopped (a write failed).
        full: Option<SyncSender<Vec<u8>>>,
        /// Written buffers, back from the writer.
        empty: Receiver<Vec<u8>>,
        /// Buffers allocated so far (at most [`BUFFERS`]).
        made: usize,
    },
    /// Into `out`, on this thread; after the first error (kept for [`stream_to`]) nothing more.
    Direct {
        out: &'a mut dyn Write,
        error: Option<std::io::Error>,
    },
}

impl Dest<'_> {
    /// Passes `buf`'s bytes on and leaves an empty buffer in `buf`. Written here, `buf` is reused. Handed to
    /// the writer, it is replaced: by a written one back from the writer, else a new one while fewer than
    /// [`BUFFERS`] exist, else the next the writer gives back.
    fn pass(&mut self, buf: &mut Vec<u8>) {
        match self {
            Dest::Direct { out, error } => {
                if error.is_none()
                    && let Err(e) = out.write_all(buf)
                {
                    *error = Some(e);
                }
                buf.clear();
            }
            Dest::Thread { full, empty, made } => {
                let Some(tx) = full else {
                    // the writer has stopped: its error is what `stream_to` returns
                    buf.clear();
                    return;
                };
                if tx.send(std::mem::take(buf)).is_err() {
                    *full = None;
                }
                *buf = match empty.try_recv() {
                    Ok(b) => b,
                    Err(_) if *made < BUFFERS => {
                        *made += 1;
                        Vec::with_capacity(CAP)
                    }
                    // none comes back when the writer has stopped
                    Err(_) => empty.recv().unwrap_or_else(|_| {
                        *full = None;
                        Vec::with_capacity(CAP)
                    }),
                };
            }
        }
    }
}

/// A [`BufMut`] that hands its full buffers on ([`Dest`]).
pub(crate) struct StreamBuf<'a> {
    buf: Vec<u8>,
    dest: Dest<'a>,
    written: u64,
    /// Placeholders to convert narrowed tensors for.
    deferred: Option<&'a Deferred>,
}

impl StreamBuf<'_> {
    /// Passes the buffer on ([`Dest::pass`]), unless it is empty.
    fn flush_buf(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        self.written += self.buf.len() as u64;
        self.dest.pass(&mut self.buf);
    }

    /// Converts `t` into the buffers, as many elements at a time as the current one has room for.
    fn put_narrowed(&mut self, t: &Narrowed) {
        let n = t.len();
        let mut at = 0;
        while at < n {
            if self.buf.len() == self.buf.capacity() {
                self.flush_buf();
            }
            let room = (self.buf.capacity() - self.buf.len()) / 2;
            if room == 0 {
                // one byte left: this element straddles two buffers
                let mut two = [0u8; 2];
                t.narrow_into(at, &mut two);
                self.put_slice(&two);
                at += 1;
                continue;
            }
            let k = room.min(n - at);
            let len = self.buf.len();
            t.narrow_into_uninit(at, &mut self.buf.spare_capacity_mut()[..2 * k]);
            // SAFETY: `narrow_into_uninit` wrote those `2 * k` bytes of the spare capacity
            unsafe { self.buf.set_len(len + 2 * k) };
            at += k;
        }
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity, which is never empty after the flush check, and
// `advance_mut` only extends the length over bytes the caller has initialized, as the trait requires.
unsafe impl BufMut for StreamBuf<'_> {
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

    /// prost writes a `bytes` field (`raw_data`) through here: a narrowed tensor's placeholder is converted,
    /// anything else copied.
    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let s = src.chunk();
            let n = s.len();
            match self.deferred.and_then(|d| d.get(s)) {
                Some(t) => self.put_narrowed(t),
                None => self.put_slice(s),
            }
            src.advance(n);
        }
    }

    fn put_slice(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            if self.buf.len() == self.buf.capacity() {
                self.flush_buf();
            }
            let n = src.len().min(self.buf.capacity() - self.buf.len());
            self.buf.extend_from_slice(&src[..n]);
            src = &src[n..];
        }
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `expected` sizes that take each way of writing: on the encoding thread, and by a second thread.
    const WAYS: [u64; 2] = [0, WRITER_THREAD_MIN];

    #[test]
    fn streams_small_and_large_writes_in_order() {
        // more than the buffers in flight, in pieces that straddle their ends: every byte once, in order
        let big: Vec<u8> = (0..5 * CAP + 3).map(|i| (i * 31 % 251) as u8).collect();
        for expected in WAYS {
            let (out, n) = stream_to(Vec::new(), None, expected, |sb| {
                sb.put_slice(b"head");
                sb.put_u32_le(0x01020304);
                sb.put_slice(&big);
                sb.put(&big[..CAP - 1]);
                sb.put_u8(9);
            })
            .unwrap();
            assert_eq!(n as usize, out.len());
            assert_eq!(&out[..8], b"head\x04\x03\x02\x01");
            assert_eq!(out.len(), 8 + big.len() + CAP - 1 + 1);
            assert_eq!(&out[8..8 + big.len()], &big[..]);
            assert_eq!(&out[8 + big.len()..out.len() - 1], &big[..CAP - 1]);
            assert_eq!(out[out.len() - 1], 9);
            let (out, n) = stream_to(Vec::new(), None, expected, |_| {}).unwrap();
            assert_eq!((out.len(), n), (0, 0));
        }
    }

    /// Counts the `write` calls that reach it from another thread than the test's.
    struct Threads {
        test: std::thread::ThreadId,
        elsewhere: usize,
        bytes: usize,
    }
    impl Write for Threads {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.elsewhere += usize::from(std::thread::current().id() != self.test);
            self.bytes += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_a_large_output_is_written_by_a_second_thread() {
        let data = vec![7u8; 3 * CAP + 1];
        for (expected, elsewhere) in [(WRITER_THREAD_MIN - 1, false), (WRITER_THREAD_MIN, true)] {
            let out = Threads {
                test: std::thread::current().id(),
                elsewhere: 0,
                bytes: 0,
            };
            let (out, n) = stream_to(out, None, expected, |sb| sb.put_slice(&data)).unwrap();
            assert_eq!((out.bytes, n as usize), (data.len(), data.len()));
            assert_eq!(out.elsewhere > 0, elsewhere, "expected {expected}");
        }
    }

    /// Takes `room` bytes, then fails every write.
    #[derive(Debug)]
    struct Full {
        room: usize,
    }
    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "disk full",
                ));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_error_is_returned_and_the_encoder_finishes() {
        // the writer fails early; the encoder goes on filling buffers (dropped) and gets the error at the end
        let big = vec![1u8; 12 * CAP];
        for expected in WAYS {
            for room in [0, 10, CAP + 1, 11 * CAP] {
                let err =
                    stream_to(Full { room }, None, expected, |sb| sb.put_slice(&big)).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "room {room}");
            }
            let full = Full { room: 12 * CAP };
            assert!(stream_to(full, None, expected, |sb| sb.put_slice(&big)).is_ok());
        }
    }

    #[test]
    fn narrowed_tensors_stream_converted_with_or_without_placeholders() {
        // after an odd number of bytes, longer than a buffer: elements straddle buffers
        let xs: Vec<f32> = (0..CAP as u32 + 7).map(|i| i as f32 * 0.37 - 9e4).collect();
        let src = Bytes::from(xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let want = Narrowed::new(src.clone(), mpopt_ir::DType::F16)
            .unwrap()
            .bytes()
            .clone();
        let ways = [false, true]
            .into_iter()
            .flat_map(|refuse| WAYS.map(|expected| (refuse, expected)));
        for (refuse, expected) in ways {
            REFUSE_MAP.set(refuse);
            let n = Narrowed::new(src.clone(), mpopt_ir::DType::F16).unwrap();
            let mut d = Deferred::default();
            let p = d.placeholder(&n);
            assert_eq!(p.len(), want.len());
            // a placeholder leaves the tensor unconverted; the fallback converts it
            assert_eq!(n.is_materialized(), refuse, "refused: {refuse}");
            let (out, _) = stream_to(Vec::new(), Some(&d), expected, |sb| {
                sb.put_slice(b"abc");
                sb.put(p.clone());
                sb.put_u8(1);
            })
            .unwrap();
            assert_eq!(&out[..3], b"abc");
            let way = format!("refused: {refuse}, expected {expected}");
            assert_eq!(&out[3..out.len() - 1], &want[..], "{way}");
            assert_eq!(out[out.len() - 1], 1);
        }
        REFUSE_MAP.set(false);
    }
}
