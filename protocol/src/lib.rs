//! paraphym's wire protocol, the only crate whose types serialize.
//!
//! A connection is a handshake ([`handshake`]) followed by frames ([`frame`]):
//! a little-endian `u32` length, then that many bytes of one message encoded by
//! [`codec`] (bincode 2, fixed-width little-endian integers). Every byte is
//! documented in docs/PROTOCOL.md, enough to write a client in another language.

pub mod client;
pub mod codec;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod paths;
pub mod units;

/// The protocol version, sent in the handshake outside bincode, so a peer of
/// any version can read it and answer "incompatible" rather than fail to decode.
pub const PROTOCOL_VERSION: u32 = 5;

/// The first bytes of every connection, in both directions.
pub const MAGIC: [u8; 8] = *b"PARAPHYM";

/// The largest frame payload accepted, in bytes. A length prefix above it is an
/// error before anything is allocated.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;
