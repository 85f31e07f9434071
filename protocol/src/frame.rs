//! Framing: each message is a little-endian `u32` payload length followed by
//! the payload. A length over [`MAX_FRAME_BYTES`] is rejected before anything
//! is read or allocated; a stream that ends inside a frame is truncated, one
//! that ends between frames is closed.

use std::io::{self, Read, Write};

use crate::MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream between frames.
    #[error("connection closed")]
    Closed,
    #[error("connection closed inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Write one frame.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n <= MAX_FRAME_BYTES)
        .ok_or(FrameError::TooLarge(payload.len() as u64))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)?;
    Ok(())
}

/// Read one frame's payload.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        got => return Err(FrameError::Truncated { got, want: 4 }),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len.into()));
    }
    // Grow with the bytes that actually arrive: a peer announcing 16 MiB and
    // sending nothing costs nothing.
    let mut payload = Vec::with_capacity((len as usize).min(64 << 10));
    let got = r.take(len.into()).read_to_end(&mut payload)?;
    if got < len as usize {
        return Err(FrameError::Truncated {
            got,
            want: len as usize,
        });
    }
    Ok(payload)
}

/// Fill `buf` unless the stream ends first; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Incremental decoding for readers that receive bytes in arbitrary pieces:
/// push bytes, pop whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or an error
    /// if the length prefix is over the limit (the stream cannot be trusted).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes"));
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len.into()));
        }
        let end = 4 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[4..end].to_vec();
        self.buf.drain(..end);
        Ok(Some(payload))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_faults_are_typed() {
        let mut wire = Vec::new();
        for p in [&b""[..], b"a", &[7u8; 1000]] {
            write_frame(&mut wire, p).unwrap();
        }
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).unwrap(), b"");
        assert_eq!(read_frame(&mut r).unwrap(), b"a");
        assert_eq!(read_frame(&mut r).unwrap(), vec![7u8; 1000]);
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));

        let mut r = &wire[..wire.len() - 10];
        read_frame(&mut r).unwrap();
        read_frame(&mut r).unwrap();
        assert!(matches!(
            read_frame(&mut r),
            Err(FrameError::Truncated {
                got: 990,
                want: 1000
            })
        ));
        assert!(matches!(
            read_frame(&mut &[1u8, 0][..]),
            Err(FrameError::Truncated { got: 2, want: 4 })
        ));
        let huge = (MAX_FRAME_BYTES + 1).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        let big = vec![0u8; MAX_FRAME_BYTES as usize + 1];
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(FrameError::TooLarge(_))
        ));
    }

    proptest! {
        /// Frames cut into arbitrary pieces come out whole and in order.
        #[test]
        fn decoder_reassembles_any_split(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in prop::collection::vec(1usize..64, 1..40),
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                write_frame(&mut wire, p).unwrap();
            }
            let mut d = FrameDecoder::default();
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= wire.len() {
                    break;
                }
                let end = (at + c).min(wire.len());
                d.push(&wire[at..end]);
                at = end;
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, payloads);
            prop_assert_eq!(d.pending(), 0);
        }

        /// Arbitrary bytes never panic the decoder: they give frames, a wait
        /// for more, or a length error.
        #[test]
        fn decoder_survives_garbage(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => prop_assert!(f.len() <= MAX_FRAME_BYTES as usize),
                    Ok(None) | Err(FrameError::TooLarge(_)) => break,
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
            let mut r = &bytes[..];
            loop {
                match read_frame(&mut r) {
                    Ok(_) => {}
                    Err(FrameError::Closed | FrameError::Truncated { .. } | FrameError::TooLarge(_)) => break,
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }
    }
}
