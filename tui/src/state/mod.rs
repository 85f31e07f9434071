//! Data the UI mirrors or owns: the conversation, the input editor, and the
//! engine as the daemon's events describe it.

pub mod chat;
pub mod editor;
pub mod engine;
