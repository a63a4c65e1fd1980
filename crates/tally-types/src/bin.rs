//! Little-endian binary encoding for persisted state (checkpoints, sealed
//! rollups, the dedupe journal), and CRC-framed records for append-only files.
//!
//! ```text
//! frame := len:u32 crc32(payload):u32 payload[len]
//! ```
//!
//! Invariant: [`Dec`] checks every length against the bytes it has, so corrupt
//! input yields [`DecodeError`], never a panic or a huge allocation.

/// Why decoding failed, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt state data at byte {at}: {what}")]
pub struct DecodeError {
    pub at: usize,
    pub what: &'static str,
}

/// An append-only encoder.
#[derive(Debug, Default, Clone)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn new() -> Self {
        Enc::default()
    }

    #[inline]
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    #[inline]
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    #[inline]
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    #[inline]
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    #[inline]
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
    }

    pub fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.i64(x);
            }
        }
    }

    /// Length-prefixed (u32) bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// A checked decoder over a byte slice.
#[derive(Debug, Clone)]
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }

    pub fn err<T>(&self, what: &'static str) -> Result<T, DecodeError> {
        Err(DecodeError { at: self.pos, what })
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return self.err("truncated");
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    #[inline]
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    #[inline]
    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_bits(self.u64()?))
    }

    pub fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            _ => self.err("bad option tag"),
        }
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).or_else(|_| self.err("invalid UTF-8"))
    }

    /// A count of items that each take at least `min_item` bytes: rejects
    /// counts the remaining input cannot hold (no huge allocation on corruption).
    pub fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return self.err("count larger than the data");
        }
        Ok(n)
    }
}

pub const FRAME_HEADER: usize = 8;

/// Appends one CRC frame holding `payload` to `out`.
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits `data` into frame payloads. Returns the payloads and the length of
/// the valid prefix; the first short or corrupt frame ends the scan.
pub fn unframe(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= FRAME_HEADER {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + FRAME_HEADER;
        if data.len() - start < len {
            break;
        }
        let payload = &data[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        pos = start + len;
    }
    (out, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_frames() {
        let mut e = Enc::new();
        e.u8(7);
        e.u32(1 << 31);
        e.i64(-5);
        e.f64(0.1);
        e.opt_i64(None);
        e.opt_i64(Some(9));
        e.str("héllo");
        let mut d = Dec::new(&e.buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 1 << 31);
        assert_eq!(d.i64().unwrap(), -5);
        assert_eq!(d.f64().unwrap(), 0.1);
        assert_eq!(d.opt_i64().unwrap(), None);
        assert_eq!(d.opt_i64().unwrap(), Some(9));
        assert_eq!(d.str().unwrap(), "héllo");
        assert!(d.is_empty());
        assert!(d.u8().is_err());

        let mut file = Vec::new();
        frame(&mut file, b"one");
        frame(&mut file, b"two");
        let whole = file.len();
        frame(&mut file, b"three");
        // A torn last frame is cut at every byte.
        for cut in whole..file.len() {
            let (p, valid) = unframe(&file[..cut]);
            assert_eq!(p, vec![&b"one"[..], &b"two"[..]]);
            assert_eq!(valid, whole);
        }
        let (p, valid) = unframe(&file);
        assert_eq!(p.len(), 3);
        assert_eq!(valid, file.len());
        // A bit flip stops the scan at the frame it hits.
        file[whole + 9] ^= 1;
        assert_eq!(unframe(&file).1, whole);
    }

    #[test]
    fn counts_are_bounded_by_the_data() {
        let mut e = Enc::new();
        e.u32(u32::MAX);
        assert!(Dec::new(&e.buf).count(8).is_err());
    }
}
