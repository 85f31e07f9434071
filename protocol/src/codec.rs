//! The one place that knows the payload encoding: bincode 2.0.1 through serde,
//! fixed-width little-endian integers (so other languages need no varints),
//! `u32` enum variant indices, `u64` lengths for strings and sequences.
//!
//! bincode is pinned at 2.0.1 (3.0.0 is an empty tombstone and the crate is
//! unmaintained, RUSTSEC-2025-0141); keeping it behind this module means a
//! replacement touches nothing else.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("malformed message: {0} bytes left over after it")]
    TrailingBytes(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ crate::MAX_FRAME_BYTES as usize }>()
}

/// Encode one message as a frame payload.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decode one message from a whole frame payload; leftover bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}
