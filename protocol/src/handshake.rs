//! The handshake: 8 magic bytes `PARAPHYM` and a little-endian `u32` protocol
//! version, outside bincode, so that any two versions can tell each other apart.
//! The client speaks first; the daemon answers with its own magic and version
//! and a status byte: 0 accepted, 1 incompatible version (then closes).

use std::io::{Read, Write};

use crate::{MAGIC, PROTOCOL_VERSION};

pub const ACCEPTED: u8 = 0;
pub const INCOMPATIBLE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer is not a paraphym endpoint (bad magic bytes)")]
    BadMagic,
    #[error(
        "protocol version mismatch: this side speaks {ours}, the other side {theirs}; \
         restart the daemon from the same paraphym version as the client"
    )]
    Incompatible { ours: u32, theirs: u32 },
    #[error("handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// The client's greeting: magic and version.
pub fn hello(version: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&MAGIC);
    b[8..].copy_from_slice(&version.to_le_bytes());
    b
}

/// Read a greeting and return the version it announces.
pub fn read_hello(r: &mut impl Read) -> Result<u32, HandshakeError> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)?;
    if b[..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    Ok(u32::from_le_bytes(b[8..].try_into().expect("4 bytes")))
}

/// Client side: greet, then read the daemon's answer.
pub fn client(stream: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    stream.write_all(&hello(PROTOCOL_VERSION))?;
    stream.flush()?;
    let theirs = read_hello(stream)?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    if status[0] != ACCEPTED || theirs != PROTOCOL_VERSION {
        return Err(HandshakeError::Incompatible {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

/// Daemon side: read the greeting, answer, and accept only our own version.
pub fn daemon(stream: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    let theirs = read_hello(stream)?;
    answer(stream, theirs)
}

/// The daemon's side in two steps: the client's greeting (its version)...
pub fn read_client_hello(stream: &mut impl Read) -> Result<u32, HandshakeError> {
    read_hello(stream)
}

/// ...and the answer to it: a daemon can do what must precede the client's
/// first request (take its connection slot) in between.
pub fn answer(stream: &mut impl Write, theirs: u32) -> Result<(), HandshakeError> {
    let ok = theirs == PROTOCOL_VERSION;
    stream.write_all(&hello(PROTOCOL_VERSION))?;
    stream.write_all(&[if ok { ACCEPTED } else { INCOMPATIBLE }])?;
    stream.flush()?;
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::Incompatible {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One end of an in-memory conversation: reads from `input`, records writes.
    struct End {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for End {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for End {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn end(input: Vec<u8>) -> End {
        End {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        }
    }

    #[test]
    fn same_versions_shake_hands_and_others_are_told_why() {
        let mut d = end(hello(PROTOCOL_VERSION).to_vec());
        daemon(&mut d).unwrap();
        let mut c = end(d.output.clone());
        client(&mut c).unwrap();
        assert_eq!(c.output, hello(PROTOCOL_VERSION));

        let mut d = end(hello(PROTOCOL_VERSION + 1).to_vec());
        let err = daemon(&mut d).unwrap_err();
        assert!(matches!(err, HandshakeError::Incompatible { .. }));
        assert_eq!(
            d.output[12], INCOMPATIBLE,
            "the old client is told, not dropped"
        );
        let mut c = end(d.output.clone());
        assert!(matches!(
            client(&mut c),
            Err(HandshakeError::Incompatible { .. })
        ));

        let mut d = end(b"GET / HTTP/1.1\r\n".to_vec());
        assert!(matches!(daemon(&mut d), Err(HandshakeError::BadMagic)));
        let mut d = end(b"PARA".to_vec());
        assert!(matches!(daemon(&mut d), Err(HandshakeError::Io(_))));
    }
}
