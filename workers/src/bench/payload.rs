//! The bench message format: a fixed ASCII header (sender or connection id, sequence number,
//! send timestamp, fingerprint) followed by printable padding, valid as both a text and a binary
//! WebSocket frame, so that every echo or delivery can be checked and timed on arrival.
//!
//! Layout (hex digits, lower case): `#` · id (8) · seq (16) · timestamp in ns since the run's
//! epoch (16) · CRC-32 of every other byte of the message (8) · padding. The fingerprint covers
//! the header fields and the padding, so a flipped byte anywhere shows up as a corrupted message.

use bytes::{Bytes, BytesMut};

const MAGIC: u8 = b'#';
const ID_AT: usize = 1;
const SEQ_AT: usize = ID_AT + 8;
const TS_AT: usize = SEQ_AT + 16;
const FP_AT: usize = TS_AT + 16;
/// Bytes taken by the header; the smallest payload the bench can send.
pub const HEADER_LEN: usize = FP_AT + 8;
const PADDING: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const HEX: &[u8; 16] = b"0123456789abcdef";

/// What a bench message says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Connection id (echo) or sender id (broadcast).
    pub id: u32,
    /// Per-id sequence number, from 0.
    pub seq: u64,
    /// Nanoseconds since the run's epoch at which the message was (scheduled to be) sent.
    pub sent_ns: u64,
}

/// Why a received frame is not a valid bench message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("shorter than the {HEADER_LEN}-byte header")]
    TooShort,
    #[error("not a bench message (bad magic or hex)")]
    Malformed,
    #[error("fingerprint mismatch")]
    Fingerprint,
    #[error("length {got} differs from the {expected} bytes sent")]
    Length { got: usize, expected: usize },
}

/// Builds bench messages of one size without allocating per message: the padding is laid out
/// once, and each message is written into a reusable buffer whose allocation is reclaimed once
/// the previous frame has been written out and dropped.
#[derive(Debug)]
pub struct PayloadWriter {
    template: Bytes,
    buf: BytesMut,
}

impl PayloadWriter {
    /// A writer of `size`-byte messages (`size` is raised to [`HEADER_LEN`]).
    pub fn new(size: usize) -> Self {
        let size = size.max(HEADER_LEN);
        let mut template = vec![0u8; size];
        for (i, b) in template.iter_mut().enumerate().skip(HEADER_LEN) {
            *b = PADDING[i % PADDING.len()];
        }
        template[0] = MAGIC;
        PayloadWriter {
            template: Bytes::from(template),
            buf: BytesMut::new(),
        }
    }

    /// Size of every message this writer builds.
    pub fn size(&self) -> usize {
        self.template.len()
    }

    /// The next message carrying `stamp`.
    pub fn write(&mut self, stamp: Stamp) -> Bytes {
        let size = self.template.len();
        self.buf.reserve(size.max(4096));
        self.buf.extend_from_slice(&self.template);
        let msg = &mut self.buf[..size];
        put_hex(&mut msg[ID_AT..SEQ_AT], u64::from(stamp.id));
        put_hex(&mut msg[SEQ_AT..TS_AT], stamp.seq);
        put_hex(&mut msg[TS_AT..FP_AT], stamp.sent_ns);
        let fp = fingerprint(msg);
        put_hex(&mut msg[FP_AT..HEADER_LEN], u64::from(fp));
        self.buf.split_to(size).freeze()
    }
}

/// Reads and checks a bench message; `expected_len` is the size that was sent.
pub fn read(msg: &[u8], expected_len: usize) -> Result<Stamp, PayloadError> {
    if msg.len() < HEADER_LEN {
        return Err(PayloadError::TooShort);
    }
    if msg[0] != MAGIC {
        return Err(PayloadError::Malformed);
    }
    let id = get_hex(&msg[ID_AT..SEQ_AT]).ok_or(PayloadError::Malformed)?;
    let seq = get_hex(&msg[SEQ_AT..TS_AT]).ok_or(PayloadError::Malformed)?;
    let sent_ns = get_hex(&msg[TS_AT..FP_AT]).ok_or(PayloadError::Malformed)?;
    let fp = get_hex(&msg[FP_AT..HEADER_LEN]).ok_or(PayloadError::Malformed)?;
    if fp != u64::from(fingerprint(msg)) {
        return Err(PayloadError::Fingerprint);
    }
    if msg.len() != expected_len {
        return Err(PayloadError::Length {
            got: msg.len(),
            expected: expected_len,
        });
    }
    let id = u32::try_from(id).map_err(|_| PayloadError::Malformed)?;
    Ok(Stamp { id, seq, sent_ns })
}

fn fingerprint(msg: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&msg[..FP_AT]);
    hasher.update(&msg[HEADER_LEN..]);
    hasher.finalize()
}

fn put_hex(out: &mut [u8], mut value: u64) {
    for b in out.iter_mut().rev() {
        *b = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn get_hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_printable_ascii() {
        let mut w = PayloadWriter::new(100);
        let stamp = Stamp {
            id: 7,
            seq: 123_456,
            sent_ns: 987_654_321,
        };
        let msg = w.write(stamp);
        assert_eq!(msg.len(), 100);
        assert!(msg.iter().all(|b| b.is_ascii_graphic()));
        assert_eq!(read(&msg, 100), Ok(stamp));
        // A second message from the same writer is independent of the first.
        let next = w.write(Stamp {
            seq: 123_457,
            ..stamp
        });
        assert_eq!(read(&msg, 100), Ok(stamp));
        assert_eq!(read(&next, 100).map(|s| s.seq), Ok(123_457));
    }

    #[test]
    fn size_is_raised_to_the_header() {
        let mut w = PayloadWriter::new(1);
        assert_eq!(w.size(), HEADER_LEN);
        let stamp = Stamp {
            id: u32::MAX,
            seq: u64::MAX,
            sent_ns: u64::MAX,
        };
        assert_eq!(read(&w.write(stamp), HEADER_LEN), Ok(stamp));
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let mut w = PayloadWriter::new(80);
        let msg = w.write(Stamp {
            id: 1,
            seq: 2,
            sent_ns: 3,
        });
        for i in 0..msg.len() {
            let mut bad = msg.to_vec();
            bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
            assert!(read(&bad, 80).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn wrong_lengths_and_foreign_frames_are_rejected() {
        let mut w = PayloadWriter::new(64);
        let msg = w.write(Stamp {
            id: 1,
            seq: 2,
            sent_ns: 3,
        });
        assert_eq!(read(&msg[..40], 64), Err(PayloadError::TooShort));
        assert_eq!(read(&msg[..60], 64), Err(PayloadError::Fingerprint));
        assert_eq!(
            read(&msg, 65),
            Err(PayloadError::Length {
                got: 64,
                expected: 65
            })
        );
        assert_eq!(read(&[b'x'; 64], 64), Err(PayloadError::Malformed));
    }
}
